"""What every command shares: the one error handler, common options, and reading the user's files."""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from ..errors import GenAdapterError
from ..state import ContextState

if TYPE_CHECKING:
    from ..adapter import GenerativeAdapter

STDIN = "-"
EXIT_USER_ERROR = 1


def one_line(message: str) -> str:
    return " ".join(str(message).split()) or "unknown error"


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{exc.filename}: {reason}" if exc.filename else reason


def fail(message: str) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with the user-error code."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


class ErrorHandlingGroup(TyperGroup):
    """Every command runs inside `invoke`, the one place that turns a GenAdapterError or an OSError into a single
    `error: <message>` line on stderr and exit code 1 (GENADAPTER_DEBUG=1 shows the traceback). Anything else
    escaping a command is a bug and keeps its traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (GenAdapterError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # reader went away (e.g. `| head`): typer exits quietly
            if os.environ.get("GENADAPTER_DEBUG"):
                raise
            fail(str(exc) if isinstance(exc, GenAdapterError) else _describe_os_error(exc))


def parse_pairs(pairs: Sequence[str] | None, option: str, as_json: bool = True) -> dict[str, Any]:
    """`KEY=VALUE` strings of a command-line option as a dict; VALUE parsed as JSON when it can be (`as_json`)."""
    values: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise GenAdapterError(f"{option} expects KEY=VALUE, got {pair!r}")
        values[key] = raw
        if as_json:
            try:
                values[key] = json.loads(raw)
            except json.JSONDecodeError:
                pass  # a plain string
    return values


def pairs_option(flag: str, help: str) -> Any:
    """A repeatable `KEY=VALUE` option (read with parse_pairs), as a typer parameter annotation."""
    return Annotated[list[str] | None, typer.Option(flag, metavar="KEY=VALUE", help=help)]


GeneratorSetOpt = pairs_option(
    "--generator-set",
    "Change a generator config field that no weight depends on, e.g. --generator-set memory_layers=0 (the memory off).",
)
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
    from ..adapter import GenerativeAdapter

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


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
