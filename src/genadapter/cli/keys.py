"""`genadapter keys create | list | revoke`: the API keys of a service database, while the server runs or not."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ..serve.store import ANONYMOUS, SQLiteStore

keys_app = typer.Typer(
    help="API keys of a `genadapter serve` database. The server reads them per request: no restart needed.",
    no_args_is_help=True,
)
DbOption = Annotated[Path, typer.Option("--db", metavar="PATH", help="SQLite database of the service.")]


def _when(seconds: float | None) -> str:
    return "-" if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


@keys_app.command("create")
def create(
    db: DbOption,
    name: Annotated[str, typer.Option("--name", help="Unique name; it owns the key's contexts.")],
    max_contexts: Annotated[
        int | None, typer.Option("--max-contexts", min=1, help="Own quota (default: the server's max_contexts).")
    ] = None,
    max_bytes: Annotated[
        int | None, typer.Option("--max-bytes", min=1, help="Own quota (default: the server's max_stored_bytes).")
    ] = None,
) -> None:
    """Make a key (and the database, if new) and print it as the last line: only its digest is stored."""
    store = SQLiteStore(db)
    try:
        key = store.create_key(name, max_contexts, max_bytes)
    finally:
        store.close()
    typer.echo(f"created key {name!r} in {db}; keep it now, it cannot be shown again:", err=True)
    typer.echo(key)


@keys_app.command("list")
def list_keys(db: DbOption) -> None:
    """Every key (never the key itself): created, revoked, contexts and bytes stored, own quotas."""
    store = SQLiteStore(db, create=False)
    try:
        rows = [(k, store.usage(k.name)) for k in store.keys()]
        anonymous = store.usage(ANONYMOUS)
    finally:
        store.close()
    table = [("NAME", "CREATED", "REVOKED", "CONTEXTS", "BYTES", "MAX_CONTEXTS", "MAX_BYTES")]
    for key, usage in rows:
        quotas = [str(q) if q is not None else "default" for q in (key.max_contexts, key.max_bytes)]
        stored = [str(usage.contexts), str(usage.nbytes)]
        table.append((key.name, _when(key.created), _when(key.revoked), *stored, *quotas))
    if anonymous.contexts:  # contexts of --no-auth requests, or of a database older than keys
        table.append((ANONYMOUS, "-", "-", str(anonymous.contexts), str(anonymous.nbytes), "default", "default"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@keys_app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="Name of the key.")],
    db: DbOption,
) -> None:
    """Revoke a key: its requests get 401 from now on; its contexts stay (and keep its name) until deleted."""
    store = SQLiteStore(db, create=False)
    try:
        store.revoke_key(name)
    finally:
        store.close()
    typer.echo(f"revoked key {name!r}", err=True)
