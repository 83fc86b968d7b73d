"""HTTP service: persistent contexts, batched per-context generation, OpenAI-compatible chat.

    serve(host="127.0.0.1", port=8000, db="contexts.db", base=None, generator=None)

Layout: `store` (ContextStore interface + SQLiteStore: contexts, ledgers, API keys), `cache` (LRU of
states), `batcher` (the one model thread: continuous batching, a different adapter per row, absorbs in
slices), `service` (endpoint logic), `auth` (API keys, Host allow-list), `streaming` (server-sent events),
`app` (FastAPI factory `create_app`), `web/` (the page at /), `launch` (run the server as a child process,
for tests and benchmarks). Web dependencies are imported
only when serving: `pip install 'genadapter[serve]'`.

Every request under /v1 needs an API key (`genadapter keys create`); `no_auth` serves without keys, as
one anonymous owner, and only on loopback. A server on a wildcard address (0.0.0.0, ::) answers to any
Host name unless `allowed_hosts` says otherwise: keys are always required there, so a DNS-rebinding page
(which has no key) gets nowhere. It starts without any key in the database, since keys can be created
later against the same database while it runs; it warns, and answers 401 until then.

The state cache holds `ContextState`s; each keeps the normalised adapter derived from it
(`GenerativeAdapter.adapter_factors` caches it on the state), so a cached context is normalised once, not in
every batch. That adds up to the size of the state again per cached context (0.8× for the shipped generator),
which the cache's byte bound does not count.
"""

from __future__ import annotations

import logging

from ..errors import GenAdapterError
from .config import ServeConfig

__all__ = ["ServeConfig", "serve"]

log = logging.getLogger(__name__)

# The two CLIs (`genadapter serve`, `python -m genadapter.serve`) describe their access options alike.
NO_AUTH_HELP = "Serve without API keys, every request as one anonymous owner; refused unless the host is loopback."
ALLOWED_HOSTS_HELP = (
    "Comma-separated Host names to answer to, '*' for any (default: the host, plus localhost, 127.0.0.1 and ::1 "
    "on loopback; any on 0.0.0.0 or ::)."
)


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
    no_auth: bool = False,
    allowed_hosts: str | None = None,
) -> None:
    """Load the model, open (or create) the SQLite database `db`, and serve until interrupted. `allowed_hosts`:
    comma-separated Host names to answer to (see `auth.allowed_hosts_for` for the default)."""
    try:
        import uvicorn

        from .app import create_app
        from .auth import allowed_hosts_for
    except ImportError as exc:
        raise GenAdapterError(
            f"serving needs the serve extra ({exc.name} is missing): pip install 'genadapter[serve]'"
        ) from exc
    from ..adapter import GenerativeAdapter
    from .store import SQLiteStore

    if not 0 <= port <= 65535:
        raise GenAdapterError(f"port {port} is not between 0 and 65535")
    hosts = allowed_hosts_for(host, no_auth, allowed_hosts)
    store = SQLiteStore(db, half=(config or ServeConfig()).half_states)  # before the model: a bad path fails fast
    try:
        if not no_auth and all(key.revoked is not None for key in store.keys()):
            log.warning(
                "%s holds no usable API key: every request under /v1 gets 401 until one is made with "
                "`genadapter keys create --db %s --name NAME` (the server need not restart)",
                db,
                db,
            )
        ga = GenerativeAdapter.from_pretrained(base=base, generator=generator, device=device)
        app = create_app(ga, store, config, no_auth=no_auth, allowed_hosts=hosts)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
    finally:
        store.close()
