"""The FastAPI application: contexts, generation, OpenAI-compatible chat completions."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError, IncompatibleStateError
from .batcher import Message as ChatTurn
from .batcher import Prompt
from .config import ServeConfig
from .errors import Invalid, ServeError, Unavailable
from .schemas import (
    BASE_MODEL,
    Answer,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    ChatResponseMessage,
    ContextInfo,
    ContextList,
    Deleted,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    Stats,
    TextRequest,
    Usage,
)
from .service import Service
from .store import ContextRecord, ContextStore

log = logging.getLogger(__name__)

DESCRIPTION = """
Absorb texts into persistent **contexts** (a constant-size state per context), then answer with the
frozen model plus each context's generated adapter. Concurrent generation requests, each with its own
context, are batched into one model call. `/v1/chat/completions` speaks the OpenAI format: `model`
names a context id, or `base` for the model without adapter. Every error is
`{"error": {"message", "type", "code"}}`.
"""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


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
            response = _error(413, f"request body over {self.max_bytes} bytes", "request_too_large")
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


def _info(service: Service, record: ContextRecord) -> ContextInfo:
    return ContextInfo(**vars(record), compatible=service.compatible(record))


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


def create_app(ga: GenerativeAdapter, store: ContextStore, config: ServeConfig | None = None) -> FastAPI:
    """The app; the model thread starts and stops with the app's lifespan. The store stays open."""
    config = config or ServeConfig()
    service = Service(ga, store, config)

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

    # ---- errors: one JSON shape, never a 500 for bad input ---------------------------------------

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s", exc.message, exc_info=exc.__cause__)
        return _error(exc.status, exc.message, exc.type)

    @app.exception_handler(IncompatibleStateError)
    async def incompatible(request: Request, exc: IncompatibleStateError) -> JSONResponse:
        return _error(409, str(exc), "conflict_error")

    @app.exception_handler(GenAdapterError)
    async def bad_input(request: Request, exc: GenAdapterError) -> JSONResponse:
        return _error(422, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        message = "; ".join(parts) or "invalid request"
        return _error(422, message[:2000], "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (e.g. not UTF-8): bad JSON
            return _error(422, f"the request body is not valid JSON: {exc.detail}", "invalid_request_error")
        response = _error(exc.status_code, str(exc.detail), "invalid_request_error")
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal server error", "server_error")

    # ---- contexts -------------------------------------------------------------------------------

    @app.post("/v1/contexts", response_model=ContextInfo, tags=["contexts"], responses=_errors(413, 422, 503))
    def create_context(body: TextRequest) -> ContextInfo:
        """Absorb a text into a new context."""
        return _info(service, service.create(body.text))

    @app.get("/v1/contexts", response_model=ContextList, tags=["contexts"], responses=_errors(422))
    def list_contexts(limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=2**62)) -> ContextList:
        """Stored contexts, oldest first."""
        return ContextList(contexts=[_info(service, r) for r in service.list(limit, offset)])

    @app.get("/v1/contexts/{context_id}", response_model=ContextInfo, tags=["contexts"], responses=_errors(404))
    def get_context(context_id: str) -> ContextInfo:
        """Metadata of a context."""
        return _info(service, service.meta(context_id))

    @app.delete("/v1/contexts/{context_id}", response_model=Deleted, tags=["contexts"], responses=_errors(404))
    def delete_context(context_id: str) -> Deleted:
        service.delete(context_id)
        return Deleted(id=context_id)

    @app.post(
        "/v1/contexts/{context_id}/absorb",
        response_model=ContextInfo,
        tags=["contexts"],
        responses=_errors(404, 409, 413, 422, 503),
    )
    def absorb(context_id: str, body: TextRequest) -> ContextInfo:
        """Add a text to the context: state += absorb(text)."""
        return _info(service, service.change(context_id, body.text))

    @app.post(
        "/v1/contexts/{context_id}/forget",
        response_model=ContextInfo,
        tags=["contexts"],
        responses=_errors(404, 409, 413, 422, 503),
    )
    def forget(context_id: str, body: TextRequest) -> ContextInfo:
        """Remove a text absorbed before: state -= absorb(text). Exact up to fp32 rounding; 409 when the
        text has more tokens than the context holds."""
        return _info(service, service.change(context_id, body.text, forget=True))

    @app.get(
        "/v1/contexts/{context_id}/peft",
        tags=["contexts"],
        response_class=Response,
        responses={200: {"content": {"application/zip": {}}}, **_errors(404, 409, 503)},
    )
    def peft(context_id: str) -> Response:
        """The context's adapter as a zipped PEFT LoRA directory (adapter_config.json + safetensors)."""
        data = service.peft_zip(context_id)
        headers = {"Content-Disposition": f'attachment; filename="{context_id}-peft.zip"'}
        return Response(data, media_type="application/zip", headers=headers)

    @app.get(
        "/v1/contexts/{context_id}/state",
        tags=["contexts"],
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}}, **_errors(404)},
    )
    def state(context_id: str) -> Response:
        """The stored state file (safetensors, as `genadapter adapt` writes it)."""
        data = service.state_bytes(context_id)
        headers = {"Content-Disposition": f'attachment; filename="{context_id}.gas"'}
        return Response(data, media_type="application/octet-stream", headers=headers)

    # ---- generation -----------------------------------------------------------------------------

    @app.post(
        "/v1/generate", response_model=GenerateResponse, tags=["generation"], responses=_errors(404, 409, 413, 422)
    )
    async def generate(body: GenerateRequest) -> GenerateResponse:
        """Answer each prompt with its own context's adapter (null: the base model), greedily."""
        max_new_tokens = body.max_new_tokens or config.default_new_tokens
        service.check_new_tokens(max_new_tokens)
        ids = [item.context_id for item in body.items]
        states = await run_in_threadpool(service.states, ids)
        prompts = [Prompt(text=item.prompt, chat=body.chat) for item in body.items]
        futures = service.submit(prompts, [states.get(i) if i else None for i in ids], max_new_tokens)
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
        responses=_errors(404, 409, 413, 422),
    )
    async def chat_completions(body: ChatRequest) -> ChatCompletion:
        """OpenAI chat completion; `model` is a context id or "base". No streaming, n=1, greedy decoding."""
        if body.stream:
            raise Invalid("streaming is not supported; send stream=false")
        if body.n not in (None, 1):
            raise Invalid("only n=1 is supported")
        max_new_tokens = body.max_completion_tokens or body.max_tokens or config.default_new_tokens
        service.check_new_tokens(max_new_tokens)
        state = None
        if body.model != BASE_MODEL:
            _, state = await run_in_threadpool(service.load, body.model)
        prompt = Prompt(messages=tuple(ChatTurn(m.role, m.text()) for m in body.messages))
        (result,) = await _results(service, service.submit([prompt], [state], max_new_tokens))
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=body.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatResponseMessage(content=result.text),
                    finish_reason=result.finish_reason,
                )
            ],
            usage=Usage(
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                total_tokens=result.prompt_tokens + result.completion_tokens,
            ),
            system_fingerprint=ga.fingerprint,
        )

    # ---- operations -----------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["operations"])
    def health() -> Health:
        return Health(base_model=ga.base_name, generator_fingerprint=ga.fingerprint)

    @app.get("/v1/stats", response_model=Stats, tags=["operations"])
    def stats() -> Stats:
        """Batches run by the model thread (by size) and the state cache."""
        return Stats(**service.worker.stats(), cache=service.cache.stats())

    return app
