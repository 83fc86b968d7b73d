"""`genadapter serve`: the HTTP service over a persistent store of context states."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..base_model import EMBEDDED_MODEL
from .common import BaseOption, GeneratorOption


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


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
    from ..serve import serve

    serve(host, port, str(db), base, str(generator) if generator else None)
