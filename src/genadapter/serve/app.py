"""The FastAPI application: contexts, generation, OpenAI-compatible chat completions."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError, IncompatibleStateError
from .auth import LOOPBACK_NAMES, CallerDep, install
from .batcher import Generation, Prompt, Sampling
from .batcher import Message as ChatTurn
from .config import ServeConfig
from .errors import Invalid, QuotaExceeded, ServeError, Unavailable
from .schemas import (
    BASE_MODEL,
    Absorbed,
    Answer,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    ChatResponseMessage,
    ChatResult,
    ContextInfo,
    ContextList,
    Deleted,
    ErrorResponse,
    ForgetRequest,
    GenerateRequest,
    GenerateResponse,
    Health,
    Ledger,
    LedgerEntry,
    Model,
    ModelList,
    Stats,
    TextRequest,
    Usage,
)
from .service import Service, remembered_text
from .store import Caller, ContextRecord, ContextStore, LedgerItem
from .streaming import DONE, TextStream, event

log = logging.getLogger(__name__)
WEB_PAGE = Path(__file__).with_name("web") / "index.html"

DESCRIPTION = """
Absorb texts into persistent **contexts** (a constant-size state per context), then answer with the
frozen model plus each context's generated adapter. Concurrent generation requests, each with its own
context, are batched into one model call. `/v1/chat/completions` speaks the OpenAI format: `model`
names a context id, or `base` for the model without adapter. Every error is
`{"error": {"message", "type", "param", "code"}}` with a string code.
"""


def _error(status: int, message: str, kind: str, code: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape: message, type, param (the field at fault, or null) and a string code."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}


class BodyLimit:
    """Answer 413 to request bodies over max_bytes (declared or streamed) before the app parses them.

    An oversized body is still read (up to a bound) and dropped, so the client gets the 413 instead
    of a reset connection."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 64 * 2**20):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max(drain_bytes, max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size <= self.max_bytes:
                chunks.append(body)
            elif size > self.drain_bytes:
                break
        if size > self.max_bytes:
            response = _error(
                413, f"request body over {self.max_bytes} bytes", "invalid_request_error", "request_too_large"
            )
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _info(service: Service, record: ContextRecord, item: LedgerItem | None = None) -> ContextInfo:
    """The record as the API shows it (not its owner); with `item`, the ledger item the request added."""
    info = {**vars(record), "compatible": service.compatible(record)}
    return ContextInfo(**info) if item is None else Absorbed(**info, item=item.id)


def _remember_mode(body: ChatRequest, turns: tuple[ChatTurn, ...]) -> str | None:
    """None, "user" or "exchange": what a chat request asks to remember, checked before the model works."""
    mode = body.genadapter.remember if body.genadapter else False
    if not mode:
        return None
    if body.model == BASE_MODEL:
        raise Invalid(f"remember needs a context to absorb into; model is {BASE_MODEL!r}", param="genadapter.remember")
    if not remembered_text(turns):
        raise Invalid("remember: the user turns are empty, nothing to absorb", param="genadapter.remember")
    return "exchange" if mode == "exchange" else "user"


async def _remember(
    service: Service, caller: Caller, context_id: str, mode: str | None, turns: tuple[ChatTurn, ...], answer: str
) -> ChatResult | None:
    """After the answer: absorb the user turns (and with "exchange" the answer) as one ledger item. The quota was
    checked before answering; should the answer itself (or a concurrent write) fill it, the answer is still returned,
    with the reason it was not remembered."""
    if mode is None:
        return None
    text = remembered_text(turns, answer if mode == "exchange" else None)
    try:
        _, item = await run_in_threadpool(service.absorb, context_id, caller, text, "remember")
    except QuotaExceeded as exc:
        return ChatResult(not_remembered=exc.message)
    return ChatResult(remembered=item.id)


def _usage(result: Generation) -> Usage:
    total = result.prompt_tokens + result.completion_tokens
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, total_tokens=total)


async def _results(service: Service, futures: list) -> list:
    """Wait for every row of a request; the first failed row fails the request."""
    waiting = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    try:
        results = await asyncio.wait_for(waiting, service.config.request_timeout_s)
    except asyncio.TimeoutError:
        raise Unavailable("timed out waiting for the model; retry later") from None
    finally:
        for future in futures:
            future.cancel()  # no-op for finished rows; rows not yet run are skipped
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def create_app(
    ga: GenerativeAdapter,
    store: ContextStore,
    config: ServeConfig | None = None,
    *,
    no_auth: bool = False,
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES,
) -> FastAPI:
    """The app; the model thread starts and stops with the app's lifespan. The store stays open.

    Requests under /v1 need an API key of the store (with no_auth, none: all act as the anonymous owner); every
    request's Host must be one of allowed_hosts ("*": any). See auth."""
    config = config or ServeConfig()
    service = Service(ga, store, config)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="genadapter", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    install(app, store, config, no_auth, allowed_hosts)

    # ---- errors: one JSON shape, never a 500 for bad input ---------------------------------------

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s", exc.message, exc_info=exc.__cause__)
        return _error(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(IncompatibleStateError)
    async def incompatible(request: Request, exc: IncompatibleStateError) -> JSONResponse:
        return _error(409, str(exc), "conflict_error", "incompatible_state")

    @app.exception_handler(GenAdapterError)
    async def bad_input(request: Request, exc: GenAdapterError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error", "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, params = [], []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
            params.append(where or None)
            parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
        message = "; ".join(parts) or "invalid request"
        return _error(400, message[:2000], "invalid_request_error", "invalid_request", params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): bad JSON
            message = f"the request body is not valid JSON: {exc.detail}"
            return _error(400, message, "invalid_request_error", "invalid_json")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = _error(exc.status_code, str(exc.detail), "invalid_request_error", code)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal server error", "server_error", "internal_error")

    # ---- contexts -------------------------------------------------------------------------------

    @app.post("/v1/contexts", response_model=Absorbed, tags=["contexts"], responses=_errors(400, 401, 413, 429, 503))
    def create_context(body: TextRequest, caller: CallerDep) -> ContextInfo:
        """Absorb a text into a new context of the caller's; the text is the first item of its ledger."""
        return _info(service, *service.create(caller, body.text))

    @app.get("/v1/contexts", response_model=ContextList, tags=["contexts"], responses=_errors(400, 401))
    def list_contexts(
        caller: CallerDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**62)
    ) -> ContextList:
        """The caller's contexts, oldest first."""
        return ContextList(contexts=[_info(service, r) for r in service.list(caller, limit, offset)])

    @app.get("/v1/contexts/{context_id}", response_model=ContextInfo, tags=["contexts"], responses=_errors(401, 404))
    def get_context(context_id: str, caller: CallerDep) -> ContextInfo:
        """Metadata of a context."""
        return _info(service, service.meta(context_id, caller))

    @app.delete("/v1/contexts/{context_id}", response_model=Deleted, tags=["contexts"], responses=_errors(401, 404))
    def delete_context(context_id: str, caller: CallerDep) -> Deleted:
        """Delete a context and its ledger."""
        service.delete(context_id, caller)
        return Deleted(id=context_id)

    @app.post(
        "/v1/contexts/{context_id}/absorb",
        response_model=Absorbed,
        tags=["contexts"],
        responses=_errors(400, 401, 404, 409, 413, 429, 503),
    )
    def absorb(context_id: str, body: TextRequest, caller: CallerDep) -> ContextInfo:
        """Add a text to the context: state += absorb(text); the text becomes an item of its ledger."""
        return _info(service, *service.absorb(context_id, caller, body.text))

    @app.get("/v1/contexts/{context_id}/ledger", response_model=Ledger, tags=["contexts"], responses=_errors(401, 404))
    def ledger(
        context_id: str,
        caller: CallerDep,
        limit: int = Query(1000, ge=1, le=10000),
        offset: int = Query(0, ge=0, le=2**62),
    ) -> Ledger:
        """What the context absorbed, one item per text with the text, oldest first."""
        items = service.ledger(context_id, caller, limit, offset)
        return Ledger(items=[LedgerEntry.model_validate(i, from_attributes=True) for i in items])

    @app.post(
        "/v1/contexts/{context_id}/forget",
        response_model=ContextInfo,
        tags=["contexts"],
        responses=_errors(400, 401, 404, 409, 503),
    )
    def forget(context_id: str, body: ForgetRequest, caller: CallerDep) -> ContextInfo:
        """Remove one item of the ledger, named by its id or by its exact text: state -= absorb(its text), exact up
        to the store's rounding (half precision by default), exact zeros once nothing is left. 409 for anything the
        ledger does not hold."""
        return _info(service, service.forget(context_id, caller, body.item, body.text))

    @app.get(
        "/v1/contexts/{context_id}/peft",
        tags=["contexts"],
        response_class=Response,
        responses={200: {"content": {"application/zip": {}}}, **_errors(401, 404, 409, 503)},
    )
    def peft(context_id: str, caller: CallerDep) -> Response:
        """The context's adapter as a zipped PEFT LoRA directory (adapter_config.json + safetensors)."""
        data = service.peft_zip(context_id, caller)
        headers = {"Content-Disposition": f'attachment; filename="{context_id}-peft.zip"'}
        return Response(data, media_type="application/zip", headers=headers)

    @app.get(
        "/v1/contexts/{context_id}/state",
        tags=["contexts"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **_errors(401, 404)},
    )
    def state(context_id: str, caller: CallerDep) -> Response:
        """The stored state file (safetensors, as `genadapter adapt` writes it)."""
        data = service.state_bytes(context_id, caller)
        headers = {"Content-Disposition": f'attachment; filename="{context_id}.gas"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    # ---- generation -----------------------------------------------------------------------------

    @app.post(
        "/v1/generate", response_model=GenerateResponse, tags=["generation"], responses=_errors(400, 404, 409, 413)
    )
    async def generate(body: GenerateRequest, caller: CallerDep) -> GenerateResponse:
        """Answer each prompt with its own context's adapter (null: the base model), greedily."""
        max_new_tokens = body.max_new_tokens or config.default_new_tokens
        service.check_new_tokens(max_new_tokens)
        ids = [item.context_id for item in body.items]
        states = await run_in_threadpool(service.states, ids, caller)
        prompts = [Prompt(text=item.prompt, chat=body.chat) for item in body.items]
        futures = service.submit(
            prompts, [states.get(i) if i else None for i in ids], Sampling(max_new_tokens=max_new_tokens)
        )
        results = await _results(service, futures)
        answers = [
            Answer(context_id=i, text=r.text, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                   finish_reason=r.finish_reason)
            for i, r in zip(ids, results, strict=True)
        ]  # fmt: skip
        return GenerateResponse(answers=answers)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        tags=["generation"],
        responses={200: {"content": {"text/event-stream": {}}}, **_errors(400, 401, 404, 409, 413, 429)},
    )
    async def chat_completions(body: ChatRequest, caller: CallerDep) -> ChatCompletion | StreamingResponse:
        """OpenAI chat completion; `model` is a context id or "base". `stream` answers with server-sent events."""
        max_new_tokens = body.max_completion_tokens or body.max_tokens or config.default_new_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        service.check_new_tokens(max_new_tokens, param)
        sampling = Sampling(
            max_new_tokens=max_new_tokens,
            temperature=body.temperature or 0.0,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stops(),
        )
        state = None
        if body.model != BASE_MODEL:
            _, state = await run_in_threadpool(service.load, body.model, caller)
        prompt = Prompt(messages=tuple(ChatTurn(m.role, m.text()) for m in body.messages))
        remember = _remember_mode(body, prompt.messages)
        if remember:
            await run_in_threadpool(service.check_absorb, body.model, caller, remembered_text(prompt.messages))
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body.model,
            "system_fingerprint": ga.fingerprint,
        }
        if body.stream:
            stream = TextStream()
            (stream.future,) = service.submit([prompt], [state], sampling, stream.on_text())
            try:
                first = await stream.first(config.request_timeout_s)
            except TimeoutError:
                stream.future.cancel()
                raise Unavailable("timed out waiting for the model; retry later") from None
            usage = body.stream_options is not None and body.stream_options.include_usage

            async def events():
                def chunk(delta: dict, finish: str | None = None, **extra) -> str:
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                    return event({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

                try:
                    yield chunk({"role": "assistant", "content": first or ""})
                    async for piece in stream.rest():
                        yield chunk({"content": piece})
                finally:
                    stream.future.cancel()  # the client went away: the row leaves the batch (no-op once finished)
                result = stream.future.result()
                remembered = await _remember(service, caller, body.model, remember, prompt.messages, result.text)
                extra = {"genadapter": remembered.model_dump()} if remembered else {}
                yield chunk({}, result.finish_reason, **extra)
                if usage:
                    counts = _usage(result).model_dump()
                    yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": counts})
                yield DONE

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        (result,) = await _results(service, service.submit([prompt], [state], sampling))
        return ChatCompletion(
            **head,
            choices=[
                ChatChoice(
                    index=0, message=ChatResponseMessage(content=result.text), finish_reason=result.finish_reason
                )
            ],
            usage=_usage(result),
            genadapter=await _remember(service, caller, body.model, remember, prompt.messages, result.text),
        )

    @app.get("/v1/models", response_model=ModelList, tags=["generation"], responses=_errors(401))
    def models(caller: CallerDep) -> ModelList:
        """What `model` may name: the base model, and the caller's contexts (oldest first)."""
        records = service.list(caller, limit=caller.quota.max_contexts, offset=0)
        base = Model(id=BASE_MODEL, created=int(started), owned_by="genadapter")
        return ModelList(data=[base, *(Model(id=r.id, created=int(r.created), owned_by=caller.name) for r in records)])

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        """The web page: contexts, ledger and streaming chat (plain HTML and JavaScript)."""
        return HTMLResponse(WEB_PAGE.read_text(encoding="utf-8"))

    # ---- operations -----------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def health() -> Health:
        return Health(base_model=ga.base_name, generator_fingerprint=ga.fingerprint)

    @app.get("/v1/stats", response_model=Stats, tags=["operations"])
    def stats() -> Stats:
        """Batches run by the model thread (by size) and the state cache."""
        return Stats(**service.worker.stats(), cache=service.cache.stats())

    return app
