"""Command-line interface: `genadapter adapt | ask | chat | export | info`.

Every command runs inside `_Group.invoke`, the one place that turns a GenAdapterError or an OSError into
a single `error: <message>` line on stderr and exit code 1 (set GENADAPTER_DEBUG=1 to see the traceback).
Anything else escaping a command is a bug and keeps its traceback.

More commands or command groups plug in as usual and get the same error handling, e.g.:

    train_app = typer.Typer(help="Train a generator.")
    app.add_typer(train_app, name="train")
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from typer.core import TyperGroup

from .errors import GenAdapterError
from .fileio import PEFT_MARKER, check_replaceable_dir
from .memory import is_memory_key
from .models import EMBEDDED_MODEL
from .state import ContextState

if TYPE_CHECKING:
    from .adapter import GenerativeAdapter

STDIN = "-"
EXIT_USER_ERROR = 1


# ---- one central error handler ----------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with the user-error code."""
    typer.echo(f"error: {_one_line(message)}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


class _Group(TyperGroup):
    """Root command group: converts the errors a user can act on into one line on stderr."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (GenAdapterError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # reader went away (e.g. `| head`): typer exits quietly
            if os.environ.get("GENADAPTER_DEBUG"):
                raise
            fail(str(exc) if isinstance(exc, GenAdapterError) else _describe_os_error(exc))


app = typer.Typer(
    cls=_Group,
    name="genadapter",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


# ---- logging: our warnings stay visible, library chatter goes away -----------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (so redirected stderr works)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LowerLevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {_one_line(record.getMessage())}"


def _configure_logging() -> None:
    logger = logging.getLogger("genadapter")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_LowerLevelFormatter())
        logger.addHandler(handler)  # e.g. "warning: UNTRAINED GENERATOR: ..."
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"genadapter {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Turn text contexts into low-rank adapters for a frozen LM, then ask questions with them."""
    _configure_logging()


# ---- shared options and helpers ---------------------------------------------------------------

BaseOption = Annotated[
    str,
    typer.Option(
        "--base",
        metavar="TEXT",
        help="Base model: the embedded one, a local model directory or a cached HF id.",
    ),
]
GeneratorOption = Annotated[
    Path | None,
    typer.Option(
        "--generator",
        metavar="DIR",
        help="Generator directory (default: the one shipped for the embedded model).",
        show_default=False,
    ),
]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens per answer.")]


def load_adapter(base: str, generator: Path | None) -> GenerativeAdapter:
    from .adapter import GenerativeAdapter

    return GenerativeAdapter.from_pretrained(base=base, generator=generator)


def decode_text(data: bytes, label: str) -> str:
    """UTF-8 text of a context file, or GenAdapterError naming what is wrong with it."""
    if b"\x00" in data:
        raise GenAdapterError(f"{label} is a binary file (it contains NUL bytes), expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GenAdapterError(f"{label} is not UTF-8 text (invalid byte at offset {exc.start})") from exc
    if not text.strip():
        raise GenAdapterError(f"{label} is empty")
    return text


def read_context(name: str) -> str:
    """Text of one context file, or of stdin for '-'."""
    if name == STDIN:
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else sys.stdin.read().encode("utf-8")
        return decode_text(data, "stdin")
    path = Path(name)
    if not path.exists():
        raise GenAdapterError(f"{path} does not exist")
    if path.is_dir():
        raise GenAdapterError(f"{path} is a directory, expected a text file")
    return decode_text(path.read_bytes(), str(path))


def read_contexts(names: list[str]) -> list[str]:
    if names.count(STDIN) > 1:
        raise GenAdapterError("'-' (stdin) can be given only once")
    return [read_context(name) for name in names]


def check_output_file(path: Path) -> None:
    """Fail before the slow work if the output file cannot be written where asked."""
    if path.is_dir():
        raise GenAdapterError(f"{path} is a directory")
    if not path.parent.is_dir():
        raise GenAdapterError(f"directory {path.parent} does not exist")


def load_state(path: Path) -> ContextState:
    if path.is_dir():
        raise GenAdapterError(f"{path} is a directory, expected a state file")
    return ContextState.load(path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---- commands ---------------------------------------------------------------------------------


@app.command()
def adapt(
    files: Annotated[
        list[str], typer.Argument(metavar="FILE", help="UTF-8 text files, one document each; '-' reads stdin.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="STATE", help="State file to write.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Chunks encoded per forward pass.")] = 8,
    base: BaseOption = EMBEDDED_MODEL,
    generator: GeneratorOption = None,
) -> None:
    """Absorb text files into a context state and save it."""
    documents = read_contexts(files)
    check_output_file(output)
    ga = load_adapter(base, generator)
    state = ga.absorb(documents, batch_size=batch_size, progress=None if sys.stderr.isatty() else False)
    state.save(output)
    typer.echo(
        f"wrote {output}: {_plural(len(documents), 'document')}, {_plural(state.num_tokens, 'token')}, "
        f"{state.nbytes} bytes",
        err=True,
    )


@app.command()
def ask(
    state_file: Annotated[Path, typer.Argument(metavar="STATE", help="State file written by `adapt`.")],
    question: Annotated[str, typer.Argument(metavar="QUESTION", help="Question to answer with the context.")],
    max_new_tokens: MaxNewTokensOption = 64,
    base: BaseOption = EMBEDDED_MODEL,
    generator: GeneratorOption = None,
) -> None:
    """Answer one question with the adapter of a saved state."""
    if not question.strip():
        raise GenAdapterError("the question is empty")
    state = load_state(state_file)
    ga = load_adapter(base, generator)
    ga.check_state(state)
    typer.echo(ga.generate(question, state=state, max_new_tokens=max_new_tokens))


@app.command()
def chat(
    context: Annotated[
        list[str],
        typer.Option("--context", "-c", metavar="FILE", help="UTF-8 text file to absorb (repeat for more)."),
    ],
    max_new_tokens: MaxNewTokensOption = 64,
    base: BaseOption = EMBEDDED_MODEL,
    generator: GeneratorOption = None,
) -> None:
    """Absorb files, then answer questions read from stdin, one per line, until EOF, 'exit' or 'quit'.

    Each question is answered on its own (the adapter, not a chat history, carries the context).
    The "> " prompt is shown only when stdin is a terminal, so piped output is one answer per line.
    """
    if STDIN in context:
        raise GenAdapterError("chat reads questions from stdin; give the context as files, not '-'")
    documents = read_contexts(context)
    ga = load_adapter(base, generator)
    state = ga.absorb(documents, progress=None if sys.stderr.isatty() else False)
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing for input())
        typer.echo(f"absorbed {_plural(state.num_tokens, 'token')}; ask away ('exit' or Ctrl-D to quit)", err=True)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                typer.echo()
            break
        question = line.strip()
        if question.lower() in ("exit", "quit"):
            break
        if question:
            typer.echo(ga.generate(question, state=state, max_new_tokens=max_new_tokens))


@app.command()
def export(
    state_file: Annotated[Path, typer.Argument(metavar="STATE", help="State file written by `adapt`.")],
    peft: Annotated[Path, typer.Option("--peft", metavar="DIR", help="Directory to write the PEFT LoRA adapter to.")],
    base: BaseOption = EMBEDDED_MODEL,
    generator: GeneratorOption = None,
) -> None:
    """Export the adapter of a state as a standard PEFT LoRA directory."""
    state = load_state(state_file)
    check_replaceable_dir(peft, PEFT_MARKER)
    ga = load_adapter(base, generator)
    ga.check_state(state)
    ga.export_peft(state, peft)
    typer.echo(f"wrote PEFT LoRA adapter to {peft} (r={ga.generator.export_rank()})", err=True)


@app.command()
def info(
    state_file: Annotated[Path, typer.Argument(metavar="STATE", help="State file written by `adapt`.")],
) -> None:
    """Describe a state file (no model is loaded)."""
    state = load_state(state_file)
    config = state.generator_config

    def get(key: str) -> str:
        return str(config.get(key, "?"))

    targets = config.get("target_modules") or []
    adapted = [name for name in state.sums if not is_memory_key(name)]
    memory = len(state.sums) - len(adapted)
    rows = [
        ("file", str(state_file)),
        ("tokens", str(state.num_tokens)),
        ("bytes", str(state.nbytes)),
        ("generator", state.generator_fingerprint),
        ("base model", state.base_model),
        ("target modules", f"{', '.join(map(str, targets)) or '?'} ({_plural(len(adapted), 'adapted module')})"),
        ("R1 (key dim)", get("key_dim")),
        ("R2 (value dim)", get("value_dim")),
        ("r (rank)", get("rank")),
        ("alpha", get("alpha")),
        ("chunk size", get("chunk_size")),
        ("normalization", get("normalization")),
        (
            "next-token memory",
            f"{get('memory_module')} in {_plural(memory // 2, 'layer')}, k = {get('memory_keys')}, "
            f"eta = {get('memory_scale')}, lambda = {get('memory_ridge')}, "
            f"targets = {config.get('memory_targets', 'next')}, beta = {config.get('memory_background', 0.0)}"
            if memory
            else "off",
        ),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key + ':':<{width + 1}} {value}")


# ---- training ---------------------------------------------------------------------------------

train_app = typer.Typer(help="Train a generator: `pretrain` (reconstruction + completion) or `instruct`.")
app.add_typer(train_app, name="train")
ConfigOption = Annotated[Path | None, typer.Option("--config", metavar="FILE", help="TrainConfig JSON file.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config field (VALUE parsed as JSON if it can be)."),
]


def parse_overrides(pairs: list[str] | None) -> dict:
    from .config import parse_pairs

    return parse_pairs(pairs, "--set")


def _train_config(config: Path | None, values: dict):
    from .train import TrainConfig

    try:
        return TrainConfig.load(config, values) if config else TrainConfig(**values)
    except TypeError as exc:
        raise GenAdapterError(f"bad training config: {exc}") from exc


def _run_recipe(recipe: str, config: Path | None, overrides: list[str] | None) -> None:
    from .train.loop import train

    final = train(_train_config(config, {**parse_overrides(overrides), "recipe": recipe}))
    typer.echo(f"wrote generator to {final}", err=True)


@train_app.command("pretrain")
def train_pretrain(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Self-supervised pretraining on Wikipedia leads + MetaICL training text (resumes from output_dir)."""
    _run_recipe("pretrain", config, set_)


@train_app.command("instruct")
def train_instruct(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Instruction tuning on (context, prompt, answer) examples, mixed with pretraining batches."""
    _run_recipe("instruct", config, set_)


@train_app.command("finalize")
def train_finalize(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="output_dir of a run with a checkpoint.pt.")],
) -> None:
    """Write RUN_DIR/generator from the latest checkpoint (e.g. of a run stopped early) and evaluate it."""
    import json

    from .train.loop import finalize_checkpoint

    typer.echo(json.dumps(finalize_checkpoint(run_dir), indent=2))


@train_app.command("heldout")
def train_heldout(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator directory.")],
    fact_f1: Annotated[
        int, typer.Option(min=1, help="Invented-entity questions answered greedily for the fact F1 (≈1 s each).")
    ] = 16,
) -> None:
    """Score a generator on the fixed held-out set: losses with its adapter, another context's, and none."""
    import json

    from .train.loop import evaluate_generator

    if not (generator / "generator_config.json").is_file():
        raise GenAdapterError(f"{generator} is not a generator directory (no generator_config.json)")
    typer.echo(json.dumps(evaluate_generator(generator, fact_f1), indent=2))


@train_app.command("calibrate")
def train_calibrate(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator with the next-token memory.")],
    out: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Where to write the calibrated generator.")],
    background: Annotated[float, typer.Option(help="memory_background (beta, > 0) of the written generator.")] = 64.0,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens of text Σ is measured on.")] = 16384,
    text: Annotated[
        list[Path] | None,
        typer.Option(metavar="FILE", help="Text files to measure on (default: the pretraining text's training split)."),
    ] = None,
    heldout_docs: Annotated[int, typer.Option(help="Wikipedia leads held out of the default text.")] = 200,
    half: Annotated[bool, typer.Option(help="Save the weights in float16 (as the shipped generator).")] = False,
    base: BaseOption = EMBEDDED_MODEL,
) -> None:
    """Write GENERATOR_DIR's generator with the memory's background term on: Σ measured on ordinary text, beta set."""
    import json
    import shutil

    import torch

    from .adapter import GenerativeAdapter
    from .fileio import write_dir_atomic
    from .generator import CONFIG_FILE

    if not (generator / CONFIG_FILE).is_file():
        raise GenAdapterError(f"{generator} is not a generator directory (no {CONFIG_FILE})")
    if text:
        texts, source = [read_context(str(path)) for path in text], [str(path) for path in text]
    else:
        from .train.data import pretrain_documents

        texts, source = pretrain_documents(heldout_docs), f"pretrain_documents(heldout={heldout_docs})"
    ga = GenerativeAdapter.from_pretrained(base=base, generator=generator, overrides={"memory_background": background})
    measured = ga.calibrate_memory(texts, max_tokens=tokens, progress=True)
    record = {"source": str(generator), "text": source, "tokens": measured, "memory_background": background}

    def write(directory: Path) -> None:
        ga.generator.save(directory, dtype=torch.float16 if half else torch.float32)
        if (generator / "train_config.json").is_file():  # how the weights were trained, for `train heldout`
            shutil.copy(generator / "train_config.json", directory / "train_config.json")
        (directory / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")

    write_dir_atomic(out, write, CONFIG_FILE)
    typer.echo(f"measured Σ on {measured} tokens; wrote {out} (generator {ga.fingerprint})")


@train_app.command("oracle")
def train_oracle(
    generator: Annotated[Path, typer.Argument(metavar="GENERATOR_DIR", help="A generator directory.")],
    questions: Annotated[int, typer.Option(help="Held-out fact questions (2 per context).")] = 8,
    steps: Annotated[int, typer.Option(help="Adam steps on each free state.")] = 25,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-2,
    through_normaliser: Annotated[
        bool, typer.Option(help="Fit the raw sum S and pass it through the normalisation, instead of S~ itself.")
    ] = False,
    base: BaseOption = EMBEDDED_MODEL,
) -> None:
    """Fit free adapter states to held-out fact questions (generator frozen): can its readout carry facts?"""
    import json

    from .train.oracle import heldout_fact_oracle

    ga = load_adapter(base, generator)
    try:
        results = heldout_fact_oracle(ga, questions, steps=steps, lr=lr, through_normaliser=through_normaliser)
    except ValueError as exc:
        raise GenAdapterError(str(exc)) from exc
    typer.echo(json.dumps(results, indent=2))


@train_app.command("ablate")
def train_ablate(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="One folder per variant + ablation.md/json.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    design_steps: Annotated[int, typer.Option(help="Steps of each from-scratch pretraining variant.")] = 50,
    objective_steps: Annotated[int, typer.Option(help="Steps of each instruction-objective variant.")] = 30,
    init_generator: Annotated[
        str | None, typer.Option(metavar="DIR", help="Generator the objective variants continue from.")
    ] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Run only these variants (repeatable).")] = None,
) -> None:
    """Equal-budget runs that change one design choice each; writes a table of held-out gains (resumable)."""
    from .train.ablation import run_ablation

    base = _train_config(config, parse_overrides(set_))
    try:
        run_ablation(base, out, design_steps, objective_steps, init_generator, variant)
    except ValueError as exc:
        raise GenAdapterError(str(exc)) from exc
    typer.echo((out / "ablation.md").read_text())


# ---- evaluation -------------------------------------------------------------------------------

from .eval import eval_app  # noqa: E402  (its heavy imports happen inside the commands)

app.add_typer(eval_app, name="eval")


# ---- service ----------------------------------------------------------------------------------


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option("--host", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    db: Annotated[Path, typer.Option("--db", metavar="PATH", help="SQLite database of context states.")] = Path(
        "genadapter.db"
    ),
    base: BaseOption = EMBEDDED_MODEL,
    generator: GeneratorOption = None,
) -> None:
    """Serve the HTTP API (contexts, generate, OpenAI-compatible chat) over a persistent state store."""
    from .serve import serve

    serve(host, port, str(db), base, str(generator) if generator else None)


if __name__ == "__main__":
    app()
