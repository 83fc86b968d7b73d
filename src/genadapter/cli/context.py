"""Commands on contexts: `adapt` (text -> state file), `ask`, `chat`, `export` (PEFT LoRA) and `info`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..base_model import EMBEDDED_MODEL
from ..errors import GenAdapterError
from ..fileio import PEFT_MARKER, check_replaceable_dir
from ..generator import is_gram_key
from ..memory import is_memory_key
from .common import (
    STDIN,
    BaseOption,
    GeneratorOption,
    MaxNewTokensOption,
    check_output_file,
    load_adapter,
    load_state,
    plural,
    read_contexts,
)


def register(app: typer.Typer) -> None:
    """Mount these commands at the top level of `app`."""
    for command in (adapt, ask, chat, export, info):
        app.command()(command)


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
        f"wrote {output}: {plural(len(documents), 'document')}, {plural(state.num_tokens, 'token')}, "
        f"{state.nbytes} bytes",
        err=True,
    )


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
        typer.echo(f"absorbed {plural(state.num_tokens, 'token')}; ask away ('exit' or Ctrl-D to quit)", err=True)
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


def info(
    state_file: Annotated[Path, typer.Argument(metavar="STATE", help="State file written by `adapt`.")],
) -> None:
    """Describe a state file (no model is loaded)."""
    state = load_state(state_file)
    config = state.generator_config

    def get(key: str) -> str:
        return str(config.get(key, "?"))

    targets = config.get("target_modules") or []
    adapted = [name for name in state.sums if not (is_memory_key(name) or is_gram_key(name))]
    memory = sum(map(is_memory_key, state.sums))
    rows = [
        ("file", str(state_file)),
        ("tokens", str(state.num_tokens)),
        ("bytes", str(state.nbytes)),
        ("generator", state.generator_fingerprint),
        ("base model", state.base_model),
        ("target modules", f"{', '.join(map(str, targets)) or '?'} ({plural(len(adapted), 'adapted module')})"),
        ("R1 (key dim)", get("key_dim")),
        ("R2 (value dim)", get("value_dim")),
        ("r (rank)", get("rank")),
        ("alpha", get("alpha")),
        ("chunk size", get("chunk_size")),
        ("normalization", get("normalization")),
        (
            "next-token memory",
            f"{get('memory_module')} in {plural(memory // 2, 'layer')}, k = {get('memory_keys')}, "
            f"eta = {get('memory_scale')}, lambda = {get('memory_ridge')}, "
            f"targets = {config.get('memory_targets', 'next')}, beta = {config.get('memory_background', 0.0)}"
            if memory
            else "off",
        ),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key + ':':<{width + 1}} {value}")
