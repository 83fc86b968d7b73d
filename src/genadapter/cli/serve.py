"""`genadapter serve`: the HTTP service over a persistent store of context states."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..base_model import EMBEDDED_MODEL
from ..serve import ALLOWED_HOSTS_HELP, NO_AUTH_HELP
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
    no_auth: Annotated[bool, typer.Option("--no-auth", help=NO_AUTH_HELP)] = False,
    allowed_hosts: Annotated[
        str | None, typer.Option("--allowed-hosts", metavar="NAMES", help=ALLOWED_HOSTS_HELP, show_default=False)
    ] = None,
) -> None:
    """Serve the HTTP API (contexts, generate, OpenAI-compatible chat) over a persistent state store. Requests need
    an API key from `genadapter keys create --db` on the same database."""
    from ..serve import serve

    gen = str(generator) if generator else None
    serve(host, port, str(db), base, gen, no_auth=no_auth, allowed_hosts=allowed_hosts)
