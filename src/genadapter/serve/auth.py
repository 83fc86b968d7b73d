"""Who may call the API: holders of API keys (or, with `--no-auth`, anyone on loopback), on allowed Host names.

Every request under /v1 must send `Authorization: Bearer <key>` with an unrevoked key of the store. Keys are looked
up on every request, so keys that `genadapter keys` creates or revokes in the same database count at once, even
while the server runs. `/healthz` and the API docs stay open. Every request's Host header must name this server
(`--allowed-hosts`): a web page whose DNS name is rebound to the server's address sends its own name, and is refused.
Routes take the caller with `caller: CallerDep` (or `Depends(current_caller)`).
"""

from __future__ import annotations

import inspect
import ipaddress
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import GenAdapterError
from .config import ServeConfig
from .errors import Invalid, ServeError, Unauthorized
from .store import ANONYMOUS, Caller, ContextStore, Quota

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")  # listen on every interface
ANY_HOST = "*"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _name(host: str) -> str:
    """A host name as the allow-list compares it: lower case, no IPv6 brackets, no trailing dot."""
    return host.strip().lower().strip("[]").rstrip(".")


def _header_name(value: str) -> str:
    """The host name of a Host header (`name`, `name:port`, `[v6]:port`)."""
    value = value.strip()
    return _name(value.partition("]")[0] if value.startswith("[") else value.partition(":")[0])


def allowed_hosts_for(host: str, no_auth: bool = False, allowed_hosts: str | None = None) -> tuple[str, ...]:
    """The Host names a server bound to `host` answers to: `allowed_hosts` (comma-separated; "*" is any) or by
    default `host`, plus the loopback names when it is loopback, or any name when it is a wildcard address (where
    keys are always required). Refuses `no_auth` off loopback, or with any Host allowed (DNS rebinding)."""
    if no_auth and not is_loopback(host):
        raise GenAdapterError(
            f"--no-auth serves without API keys, so it is allowed only on a loopback host (127.0.0.1, ::1, "
            f"localhost), not {host!r}; create keys with `genadapter keys create` instead"
        )
    if allowed_hosts is not None:
        names = [_name(h) for h in allowed_hosts.split(",") if h.strip()]
        if not names:
            raise GenAdapterError("--allowed-hosts names no host")
    elif host in WILDCARD_ADDRESSES:
        names = [ANY_HOST]
    else:
        names = [_name(host), *(LOOPBACK_NAMES if is_loopback(host) else ())]
    if no_auth and ANY_HOST in names:
        raise GenAdapterError("--no-auth with any Host allowed would let any web page use the server (DNS rebinding)")
    return tuple(dict.fromkeys(names))


async def _reject(exc: ServeError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with the app's own ServeError handler, so these errors have the shape of every other."""
    handlers = scope["app"].exception_handlers
    handler = next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
    response = handler(Request(scope, receive), exc)
    if inspect.isawaitable(response):
        response = await response
    await response(scope, receive, send)


class HostCheck:
    """400 for a request whose Host header is not on the allow-list."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]):
        self.app = app
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ANY_HOST not in self.allowed:
            host = Headers(scope=scope).get("host", "")
            if _header_name(host) not in self.allowed:
                message = f"this server does not answer to the Host {host[:100]!r} (see its --allowed-hosts)"
                await _reject(Invalid(message, param="Host"), scope, receive, send)
                return
        await self.app(scope, receive, send)


class Authenticate:
    """Identify the caller of every request under /v1 before its body is read (401 if it has no valid key), and
    leave it in the request's state for `current_caller`."""

    def __init__(self, app: ASGIApp, store: ContextStore, config: ServeConfig, no_auth: bool):
        self.app = app
        self.store = store
        self.quota = Quota(config.max_contexts, config.max_stored_bytes)
        self.no_auth = no_auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            try:
                caller = await run_in_threadpool(self.identify, Headers(scope=scope).get("authorization"))
            except ServeError as exc:
                await _reject(exc, scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)

    def identify(self, authorization: str | None) -> Caller:
        if self.no_auth:
            return Caller(ANONYMOUS, self.quota)
        if not authorization:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        record = self.store.find_key(key)
        if record is None:
            raise Unauthorized("invalid API key")
        if record.revoked is not None:
            raise Unauthorized(f"the API key {record.name!r} was revoked")
        quota = Quota(record.max_contexts or self.quota.max_contexts, record.max_bytes or self.quota.max_bytes)
        return Caller(record.name, quota)


def install(app: FastAPI, store: ContextStore, config: ServeConfig, no_auth: bool, allowed: tuple[str, ...]) -> None:
    """Add both checks to `app`, outermost (so first) the Host check, then the key check."""
    app.add_middleware(Authenticate, store=store, config=config, no_auth=no_auth)
    app.add_middleware(HostCheck, allowed=allowed)


_BEARER = HTTPBearer(auto_error=False, description="An API key made by `genadapter keys create`.")


def current_caller(
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None
) -> Caller:
    """The caller that Authenticate identified (the Bearer parameter only documents the scheme in OpenAPI)."""
    caller = request.scope.get("state", {}).get("caller")
    if caller is None:  # a route outside /v1 that asks for a caller
        raise Unauthorized("this route needs an API key")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]
