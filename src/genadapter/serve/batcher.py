"""One model thread: every use of the model and tokenizer runs here, generation requests in batches.

Generation requests that arrive together, each with its own context state (or none), become one
`ga.generate(prompts, state=[...])` call: a different adapter per batch row. The first request of a
batch waits up to `batch_wait_s` for company; requests that queue while the model is busy join the
next batch at once. Rows of one batch share `max_new_tokens` (requests with another value wait for
the next batch). Other model work (absorb, export) is queued as plain calls on the same thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError
from ..state import ContextState
from .errors import Invalid, ServeError, TooLarge, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """A plain prompt (wrapped in the chat template when `chat`), or a whole conversation."""

    text: str | None = None
    chat: bool = True
    messages: tuple[Message, ...] | None = None


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The conversation as the model sees it, ending where the assistant's answer starts.

    With a chat template: the template over all messages ("developer" is sent as "system").
    Without one: the trailing user message(s), one per line."""
    if not any(m.role == "user" for m in messages):
        raise Invalid("messages must include at least one user message")
    if getattr(tokenizer, "chat_template", None):
        rows = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in messages]
        try:
            return tokenizer.apply_chat_template(rows, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 raises TemplateError; templates raise for roles they refuse
            raise Invalid(f"the model's chat template rejects these messages: {exc}") from exc
    tail: list[str] = []
    for message in reversed(messages):
        if message.role != "user":
            break
        tail.append(message.content)
    if not tail:
        raise Invalid("without a chat template, the conversation must end with a user message")
    return "\n".join(reversed(tail))


def render(ga: GenerativeAdapter, prompt: Prompt) -> str:
    if prompt.messages is not None:
        return render_chat(ga.tokenizer, prompt.messages)
    return ga.format_prompt(prompt.text or "", prompt.chat)


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int  # the answer re-tokenised (generate returns text only)
    finish_reason: str  # "length" when the answer has max_new_tokens tokens, else "stop"


@dataclass
class _GenerationJob:
    prompt: Prompt
    state: ContextState | None
    max_new_tokens: int
    future: Future
    enqueued: float = field(default_factory=time.monotonic)
    text: str = ""
    prompt_tokens: int = 0


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future


class ModelWorker:
    """The single thread that owns the model; submit work, get concurrent.futures.Future back."""

    def __init__(
        self,
        ga: GenerativeAdapter,
        max_batch: int = 16,
        batch_wait_s: float = 0.005,
        max_queue: int = 1024,
        max_prompt_tokens: int = 4096,
    ):
        self.ga = ga
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self.window = getattr(ga.model.config, "max_position_embeddings", None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batch_sizes: Counter[int] = Counter()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="genadapter-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the job in hand, fail the queued ones with 503, join the thread."""
        if self._thread is None:
            return
        self._stopping = True
        while True:  # make room for the stop marker, failing what we take out
            try:
                self._queue.put_nowait(_STOP)
                break
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._fail(self._queue.get_nowait())
        self._thread.join(timeout)
        self._thread = None

    # ---- submitting -----------------------------------------------------------------------------

    def _put(self, job: Any) -> None:
        if self._stopping:
            raise Unavailable("the server is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Unavailable("the model queue is full; retry later") from None

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run fn() on the model thread."""
        future: Future[T] = Future()
        self._put(_CallJob(fn, future))
        return future

    def generate(self, prompt: Prompt, state: ContextState | None, max_new_tokens: int) -> Future[Generation]:
        future: Future[Generation] = Future()
        self._put(_GenerationJob(prompt, state, max_new_tokens, future))
        return future

    def stats(self) -> dict:
        return {
            "queued": self._queue.qsize(),
            "batches": sum(self.batch_sizes.values()),
            "rows": sum(size * n for size, n in self.batch_sizes.items()),
            "max_batch_size": max(self.batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
        }

    # ---- the model thread -----------------------------------------------------------------------

    def _run(self) -> None:
        pending: deque[_GenerationJob] = deque()
        while True:
            if not pending:
                job = self._queue.get()
                if job is _STOP:
                    return
                if isinstance(job, _CallJob):
                    self._run_call(job)
                    continue
                if self._prepare(job):
                    pending.append(job)
                continue
            calls, stop = self._collect(pending)
            key = pending[0].max_new_tokens
            batch = [j for j in pending if j.max_new_tokens == key][: self.max_batch]
            for job in batch:
                pending.remove(job)
            self._run_batch(batch)
            for call in calls:
                self._run_call(call)
            if stop:
                for job in pending:
                    self._fail(job)
                return

    def _collect(self, pending: deque[_GenerationJob]) -> tuple[list[_CallJob], bool]:
        """Take queued jobs until the oldest pending job's batch is full or its wait is over."""
        deadline = pending[0].enqueued + self.batch_wait_s
        calls: list[_CallJob] = []
        while sum(j.max_new_tokens == pending[0].max_new_tokens for j in pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return calls, True
            if isinstance(job, _CallJob):
                calls.append(job)  # run after this batch
            elif self._prepare(job):
                pending.append(job)
        return calls, False

    def _prepare(self, job: _GenerationJob) -> bool:
        """Render and measure the prompt; a bad one fails alone, before it can join a batch."""
        if job.future.cancelled():
            return False
        try:
            job.text = render(self.ga, job.prompt)
            job.prompt_tokens = len(self.ga.tokenizer(job.text, add_special_tokens=False)["input_ids"])
            if job.prompt_tokens == 0:
                raise Invalid("the prompt is empty")
            if job.prompt_tokens > self.max_prompt_tokens:
                raise TooLarge(f"the prompt has {job.prompt_tokens} tokens; the limit is {self.max_prompt_tokens}")
            if self.window and job.prompt_tokens + job.max_new_tokens > self.window:
                raise TooLarge(
                    f"the prompt ({job.prompt_tokens} tokens) plus max_new_tokens ({job.max_new_tokens}) "
                    f"exceeds the model's window of {self.window} tokens"
                )
        except Exception as exc:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
            return False
        return True

    def _generate(self, jobs: list[_GenerationJob]) -> list[Generation]:
        states = [j.state for j in jobs]
        limit = jobs[0].max_new_tokens
        answers = self.ga.generate(
            [j.text for j in jobs],
            state=None if all(s is None for s in states) else states,
            max_new_tokens=limit,
            chat=False,
        )
        results = []
        for job, answer in zip(jobs, answers, strict=True):
            n = min(len(self.ga.tokenizer(answer, add_special_tokens=False)["input_ids"]), limit)
            results.append(Generation(answer, job.prompt_tokens, n, "length" if n >= limit else "stop"))
        return results

    def _run_batch(self, jobs: list[_GenerationJob]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        try:
            results = self._generate(live)
        except Exception as exc:
            if len(live) == 1:
                _log_failure(exc)
                live[0].future.set_exception(exc)
                return
            log.warning("a batch of %d rows failed; retrying them one by one", len(live))
            for job in live:  # one bad row must not fail the others
                try:
                    job.future.set_result(self._generate([job])[0])
                except Exception as row_exc:
                    _log_failure(row_exc)
                    job.future.set_exception(row_exc)
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except Exception as exc:
            job.future.set_exception(exc)

    @staticmethod
    def _fail(job: Any) -> None:
        if isinstance(job, _GenerationJob | _CallJob) and job.future.set_running_or_notify_cancel():
            job.future.set_exception(Unavailable("the server is shutting down"))


def _log_failure(exc: Exception) -> None:
    if not isinstance(exc, GenAdapterError | ServeError):  # those answer the client; anything else is a bug
        log.error("generation failed", exc_info=exc)
