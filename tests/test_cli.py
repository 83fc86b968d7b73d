"""The `genadapter` command line on tiny on-disk models: happy paths and one-line errors for every failure."""

import errno
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MEMORY, TEXT_A, TEXT_B, make_adapter, make_model, make_tokenizer, randomize_b, tiny_config
from typer.testing import CliRunner

import genadapter.adapter
from genadapter import AdapterGenerator, ContextState, GenerativeAdapter, StateFileError
from genadapter.cli import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_error(result, *fragments):
    """Exit code 1, exactly one `error: ...` line on stderr, no traceback anywhere."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped uncaught
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("GENADAPTER_DEBUG", raising=False)


@pytest.fixture
def model_args(tiny_dirs):
    base, gen = tiny_dirs
    return ["--base", base, "--generator", gen]


DOC_A = TEXT_A.split(". ")[0] + "."  # short documents keep the test file fast
DOC_B = TEXT_B


@pytest.fixture
def texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(DOC_A)
    b.write_text(DOC_B)
    return a, b


@pytest.fixture
def state_file(tmp_path, texts, model_args):
    """A state made by the CLI with the tiny_dirs model and generator."""
    path = tmp_path / "a.gas"
    assert run("adapt", texts[0], "-o", path, *model_args).exit_code == 0
    return path


@functools.cache
def _any_state_bytes() -> bytes:
    return make_adapter().absorb(DOC_B).to_bytes()


@pytest.fixture
def any_state(tmp_path):
    """A valid state file from an in-memory model, for tests that fail before its model would matter."""
    path = tmp_path / "any.gas"
    path.write_bytes(_any_state_bytes())
    return path


@pytest.fixture
def loaded(tiny_dirs):
    base, gen = tiny_dirs
    return GenerativeAdapter.from_pretrained(base=str(base), generator=gen)


# ---- happy paths ------------------------------------------------------------------------------


def test_adapt_info_ask_export(tmp_path, texts, model_args, tiny_dirs, loaded):
    out = tmp_path / "ab.gas"
    result = run("adapt", *texts, "-o", out, "--batch-size", 2, *model_args)
    assert result.exit_code == 0, result.output
    state = ContextState.load(out)
    assert state.allclose(loaded.absorb([DOC_A, DOC_B]))
    assert result.stdout == ""
    summary = result.stderr.splitlines()
    assert len(summary) == 1
    assert str(out) in summary[0] and f"{state.num_tokens} tokens" in summary[0] and str(state.nbytes) in summary[0]

    result = run("info", out)
    assert result.exit_code == 0, result.output
    info = dict(line.split(":", 1) for line in result.stdout.splitlines())
    info = {k: v.strip() for k, v in info.items()}
    assert info["tokens"] == str(state.num_tokens)
    assert info["bytes"] == str(state.nbytes)
    assert info["generator"] == loaded.fingerprint
    assert info["base model"] == str(tiny_dirs[0])
    assert "o_proj, down_proj" in info["target modules"]
    assert (info["R1 (key dim)"], info["R2 (value dim)"], info["r (rank)"]) == ("8", "8", "8")
    assert (info["chunk size"], info["normalization"]) == ("16", "svd")

    question = "Where is the tower?"
    result = run("ask", out, question, "--max-new-tokens", 3, *model_args)
    assert result.exit_code == 0, result.output
    assert result.stdout == loaded.generate(question, state=state, max_new_tokens=3) + "\n"

    lora = tmp_path / "lora"
    result = run("export", out, "--peft", lora, *model_args)
    assert result.exit_code == 0, result.output
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == 8
    assert (lora / "adapter_model.safetensors").is_file()
    assert run("export", out, "--peft", lora, *model_args).exit_code == 0  # a previous export is replaced


def test_adapt_reads_stdin_for_dash(tmp_path, texts, model_args):
    from_files, from_stdin = tmp_path / "files.gas", tmp_path / "stdin.gas"
    assert run("adapt", *texts, "-o", from_files, *model_args).exit_code == 0
    result = run("adapt", texts[0], "-", "-o", from_stdin, *model_args, input=DOC_B)
    assert result.exit_code == 0, result.output
    assert ContextState.load(from_stdin).allclose(ContextState.load(from_files))


def test_chat_answers_piped_questions_until_exit(texts, model_args, loaded):
    result = run(
        "chat", "--context", texts[0], "--max-new-tokens", 2, *model_args, input="Where?\n\nWhen?\nexit\nNo?\n"
    )
    assert result.exit_code == 0, result.output
    state = loaded.absorb([DOC_A])
    expected = [loaded.generate(q, state=state, max_new_tokens=2) for q in ("Where?", "When?")]
    assert result.stdout == "".join(answer + "\n" for answer in expected)  # no prompts when stdin is a pipe
    assert result.stderr == ""


def test_chat_through_a_real_pipe_until_eof(texts, model_args, loaded):
    command = [sys.executable, "-m", "genadapter.cli", "chat", "-c", texts[0], "-c", texts[1], "--max-new-tokens", 3]
    proc = subprocess.run(
        [str(arg) for arg in command + model_args], input="Where?\nWho?\n", capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    state = loaded.absorb([DOC_A, DOC_B])
    assert proc.stdout == "".join(loaded.generate(q, state=state, max_new_tokens=3) + "\n" for q in ("Where?", "Who?"))


def test_untrained_generator_warning_stays_visible(tmp_path, texts, tiny_dirs):
    result = run("adapt", texts[0], "-o", tmp_path / "s.gas", "--base", tiny_dirs[0])
    assert result.exit_code == 0, result.output
    assert "warning: UNTRAINED GENERATOR" in result.stderr


def test_info_loads_no_model(any_state, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("info must not load a model")

    monkeypatch.setattr(genadapter.adapter.GenerativeAdapter, "from_pretrained", refuse)
    monkeypatch.setattr(genadapter.adapter, "load_base", refuse)
    result = run("info", any_state)
    assert result.exit_code == 0, result.output


def test_train_calibrate_writes_a_generator_with_the_memory_background_on(tmp_path, texts, tiny_dirs):
    base, gen = tiny_dirs
    memory_gen = tmp_path / "memory-gen"
    GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=MEMORY).generator.save(memory_gen)
    (memory_gen / "train_config.json").write_text("{}")
    out = tmp_path / "calibrated"
    args = (
        "train",
        "calibrate",
        memory_gen,
        out,
        "--text",
        texts[1],
        "--tokens",
        20,
        "--background",
        3,
        "--memory-scale",
        5,
        "--generator-set",
        "memory_keys=4",
        "--base",
        base,
    )
    result = run(*args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "calibration.json").read_text())
    assert record["tokens"] == 20 and record["memory_background"] == 3.0 and (out / "train_config.json").is_file()
    calibrated = GenerativeAdapter.from_pretrained(base=str(base), generator=out)
    assert calibrated.config.memory_background == 3.0 and calibrated.generator.memory.calibrated
    assert calibrated.config.memory_scale == 5.0  # MEMORY trained at 2.0: the strength it ships at is set here
    assert calibrated.config.memory_keys == 4 and record["overrides"] == {"memory_keys": 4, "memory_scale": 5.0}
    assert calibrated.fingerprint in result.output
    state_file = tmp_path / "s.gas"
    assert run("adapt", texts[0], "-o", state_file, "--base", base, "--generator", out).exit_code == 0
    assert "targets = next, beta = 3.0" in run("info", state_file).output

    assert_error(
        run("train", "calibrate", gen, tmp_path / "x", "--text", texts[1], "--base", base), "memory_background > 0"
    )
    assert_error(run("train", "calibrate", tmp_path, tmp_path / "x", "--base", base), "not a generator directory")


def test_train_calibrate_refuses_an_unwritable_out_before_measuring(tmp_path, tiny_dirs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the output directory must be checked before the model is loaded")

    monkeypatch.setattr(GenerativeAdapter, "from_pretrained", refuse)
    missing_parent = tmp_path / "absent" / "out"
    assert_error(run("train", "calibrate", tiny_dirs[1], missing_parent, "--base", tiny_dirs[0]), "does not exist")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    assert_error(run("train", "calibrate", tiny_dirs[1], tmp_path / "notes", "--base", tiny_dirs[0]), "not replacing")


# ---- errors: one line on stderr, exit code 1 ----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        ("café au lait".encode("latin-1"), "not UTF-8"),
    ],
    ids=["missing", "empty", "blank", "binary", "latin-1"],
)
def test_adapt_rejects_bad_input_before_loading_the_model(tmp_path, texts, content, message):
    bad = tmp_path / "bad.txt"
    if content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out.gas"
    # an unknown model would fail too: the file's error proves inputs are checked first
    result = run("adapt", texts[0], bad, "-o", out, "--base", "no-such-model")
    assert_error(result, str(bad), message)
    assert not out.exists()


def test_adapt_rejects_empty_stdin_and_directories(tmp_path, model_args):
    assert_error(run("adapt", "-", "-o", tmp_path / "s.gas", *model_args, input=""), "stdin is empty")
    assert_error(run("adapt", tmp_path, "-o", tmp_path / "s.gas", *model_args), "is a directory")


def test_adapt_rejects_missing_output_directory(tmp_path, texts):
    assert_error(run("adapt", texts[0], "-o", tmp_path / "nope" / "s.gas", "--base", "no-such-model"), "nope")


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncated, "corrupted or truncated"),
        (lambda path: os.urandom(4096), "corrupted or truncated"),
        (lambda path: b"", "corrupted or truncated"),
        (None, "does not exist"),
    ],
    ids=["truncated", "random-bytes", "zero-bytes", "missing"],
)
@pytest.mark.parametrize("command", ["info", "ask", "export"])
def test_bad_state_files(tmp_path, any_state, model_args, command, corrupt, message):
    bad = tmp_path / "bad.gas"
    if corrupt is not None:
        bad.write_bytes(corrupt(any_state))
    args = {"info": [], "ask": ["Where?", *model_args], "export": ["--peft", tmp_path / "lora", *model_args]}
    assert_error(run(command, bad, *args[command]), str(bad), message)
    assert not (tmp_path / "lora").exists()


@pytest.fixture
def other_generator(tmp_path, tiny_dirs):
    """A generator for the same tiny base, initialised from another seed."""
    base, _ = tiny_dirs
    generator = AdapterGenerator.for_model(make_model(len(make_tokenizer())), tiny_config(seed=7, base_model=str(base)))
    randomize_b(generator, seed=8)
    generator.save(tmp_path / "gen2")
    return tmp_path / "gen2"


@pytest.mark.parametrize("command", ["ask", "export"])
def test_state_from_another_generator(tmp_path, state_file, tiny_dirs, other_generator, command):
    args = ["Where?"] if command == "ask" else ["--peft", tmp_path / "lora"]
    result = run(command, state_file, *args, "--base", tiny_dirs[0], "--generator", other_generator)
    assert_error(result, "state was made by generator")
    assert not (tmp_path / "lora").exists()


def test_state_from_another_generator_in_a_real_process(state_file, tiny_dirs, other_generator):
    """Real stderr: no library log line or warning sneaks in next to the error."""
    command = [sys.executable, "-m", "genadapter.cli", "ask", state_file, "Where?"]
    model = ["--base", tiny_dirs[0], "--generator", other_generator]
    proc = subprocess.run([str(arg) for arg in command + model], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: state was made by generator") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "model",
    [["--base", "no-such-model"], ["--base", "/no/such/dir"], ["--generator", "/no/such/generator"]],
    ids=["unknown-name", "missing-base-dir", "missing-generator-dir"],
)
def test_unknown_model(tmp_path, any_state, texts, tiny_dirs, model):
    args = dict(zip(["--base", "--generator"], tiny_dirs, strict=True))
    args.update(dict([model]))
    model_args = [x for item in args.items() for x in item]
    assert_error(run("ask", any_state, "Where?", *model_args))
    assert_error(run("adapt", texts[0], "-o", tmp_path / "new.gas", *model_args))
    assert not (tmp_path / "new.gas").exists()


def test_no_space_left_while_saving_a_state(tmp_path, texts, model_args, monkeypatch):
    def full_disk(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_error(run("adapt", texts[0], "-o", out_dir / "s.gas", *model_args), "no space left")
    assert list(out_dir.iterdir()) == []  # neither the state nor a temporary file


def test_no_space_left_while_exporting(tmp_path, state_file, model_args, monkeypatch):
    write_bytes = Path.write_bytes

    def full_disk(path: Path, data: bytes) -> int:
        if path.name != "adapter_model.safetensors":
            return write_bytes(path, data)
        write_bytes(path, b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_error(run("export", state_file, "--peft", out_dir / "lora", *model_args), "no space left")
    assert list(out_dir.iterdir()) == []


def test_export_refuses_to_replace_an_unrelated_directory(tmp_path, any_state, model_args):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert_error(run("export", any_state, "--peft", precious, *model_args), "not replacing it")
    assert (precious / "notes.txt").read_text() == "keep me"


def test_ask_rejects_an_empty_question(any_state, model_args):
    assert_error(run("ask", any_state, "  ", *model_args), "question is empty")


def test_debug_env_shows_the_original_exception(any_state, monkeypatch):
    monkeypatch.setenv("GENADAPTER_DEBUG", "1")
    result = run("info", any_state.with_name("missing.gas"))
    assert isinstance(result.exception, StateFileError)
