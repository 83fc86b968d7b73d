"""Command-line interface `genadapter`: one module per command group.

- `context.py`: adapt, ask, chat, export, info (contexts and their states);
- `train.py`: `train pretrain | instruct | finalize | heldout | calibrate | oracle | ablate`;
- `eval.py`: `eval knowledge | icl | persona | compare`;
- `serve.py`: serve;
- `keys.py`: `keys create | list | revoke` (API keys of a serve database);
- `common.py`: the one error handler (`error: <message>` on stderr, exit code 1), shared options, file reading.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Annotated

import typer

from . import context, serve
from .common import ErrorHandlingGroup, one_line
from .eval import eval_app
from .keys import keys_app
from .train import train_app

app = typer.Typer(
    cls=ErrorHandlingGroup,
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
        return f"{record.levelname.lower()}: {one_line(record.getMessage())}"


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
        from .. import __version__

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


context.register(app)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
serve.register(app)
app.add_typer(keys_app, name="keys")

__all__ = ["app"]
