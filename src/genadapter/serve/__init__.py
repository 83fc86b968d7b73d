"""HTTP service: persistent contexts, batched per-context generation, OpenAI-compatible chat.

    serve(host="127.0.0.1", port=8000, db="contexts.db", base=None, generator=None)

Layout: `store` (ContextStore interface + SQLiteStore), `cache` (LRU of states), `batcher` (the one
model thread; batches generation requests, a different adapter per row), `service` (endpoint logic),
`app` (FastAPI factory `create_app`), `launch` (run the server as a child process, for tests and
benchmarks). Web dependencies are imported only when serving: `pip install 'genadapter[serve]'`.

The state cache holds `ContextState`s; each keeps the normalised adapter derived from it
(`GenerativeAdapter.adapter_factors` caches it on the state), so a cached context is normalised once, not in
every batch. That adds up to the size of the state again per cached context (0.8× for the shipped generator),
which the cache's byte bound does not count.
"""

from __future__ import annotations

import ipaddress
import logging

from ..errors import GenAdapterError
from .config import ServeConfig

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: str,
    port: int,
    db: str,
    base: str | None,
    generator: str | None,
    *,
    config: ServeConfig | None = None,
    device: str = "cpu",
    log_level: str = "info",
) -> None:
    """Load the model, open (or create) the SQLite database `db`, and serve until interrupted."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise GenAdapterError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'genadapter[serve]'"
        ) from exc
    from ..adapter import GenerativeAdapter
    from .store import SQLiteStore

    if not 0 <= port <= 65535:
        raise GenAdapterError(f"port {port} is not between 0 and 65535")
    store = SQLiteStore(db)  # first: a bad path fails before the model loads
    try:
        ga = GenerativeAdapter.from_pretrained(base=base, generator=generator, device=device)
        app = create_app(ga, store, config)
        if not _is_loopback(host):
            log.warning("serving on %s: the API has no authentication; anyone who can reach it can use it", host)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        store.close()
