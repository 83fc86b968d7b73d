"""One model thread: every use of the model and tokenizer runs here, generation by continuous batching.

Generation requests, each with its own context state (or none), its own sampling and stop condition, are rows of
one running batch with a different adapter per row. The thread drives the batch one decode step at a time; between
two steps rows join and leave: a joining group's prompts are prefilled (`prefill_chunk_tokens` columns per step,
in a cache of their own) and then merged into the batch's KV cache with left padding, and a row that finishes
(stop token, stop string, max_new_tokens) leaves at once, its future resolved. When the model is idle, the first
request waits up to `batch_wait_s` for company; later ones join the running batch at the next step, up to
`max_batch` rows. A request that cannot run (prompt too long, unusable state) fails alone, before it joins.

Other model work queues on the same thread: plain calls (PEFT export) run between two steps; step jobs (absorbing
a text, one forward per step) run a step at a time, round robin, and while requests are generating they get at
most as much of the thread's time as generation does: chats keep flowing through a long absorb.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor
from transformers import DynamicCache

from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError
from ..state import ContextState
from .errors import Invalid, ServeError, TooLarge, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()  # wakes the thread when stopping
# chars of a text tokenized, per token of a limit, to prove the text over the limit (ordinary text: ~4 per token)
CHARS_PER_TOKEN = 8
_LAST_WORD_END = re.compile(r"(?s).*\S(?= )")  # greedy: up to the last non-space followed by a space


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """A plain prompt (wrapped in the chat template when `chat`), or a whole conversation.

    Message contents and chat prompts are user text: special-token strings in them stay text. A raw prompt
    (`chat=False`) is the model's input as its sender wrote it, control tokens included."""

    text: str | None = None
    chat: bool = True
    messages: tuple[Message, ...] | None = None


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded, and when it ends."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # same seed + same request -> same answer (per-row torch.Generator)
    stop: tuple[str, ...] = ()  # the answer ends before the first stop string, finish_reason "stop"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise Invalid("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise Invalid("temperature must not be negative")
        if not 0 < self.top_p <= 1:
            raise Invalid("top_p must be in (0, 1]")
        if any(not s for s in self.stop):
            raise Invalid("stop strings must not be empty")


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the stop token or the one that completed a stop string included
    finish_reason: str  # "stop" (stop token or stop string) or "length" (max_new_tokens reached)


# ---- prompts -> token ids ---------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """The conversation as the model sees it, ending where the assistant's answer starts, in pieces:
    (text, True) from the chat template, (text, False) a message's content.

    With a chat template: the template over all messages ("developer" is sent as "system"), rendered around
    placeholders so that each content goes in as sent. Without one: the trailing user message(s), one per line."""
    if not any(m.role == "user" for m in messages):
        raise Invalid("messages must include at least one user message")
    if getattr(tokenizer, "chat_template", None):
        marker = f"@{uuid.uuid4().hex}@"
        rows = [
            {"role": "system" if m.role == "developer" else m.role, "content": f"{marker}{i}@"}
            for i, m in enumerate(messages)
        ]
        try:
            rendered = tokenizer.apply_chat_template(rows, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja2 raises TemplateError; templates raise for roles they refuse
            raise Invalid(f"the model's chat template rejects these messages: {exc}") from exc
        pieces = re.split(re.escape(marker) + r"(\d+)@", rendered)  # template, index, template, ..., template
        return [(p, True) if k % 2 == 0 else (messages[int(p)].content, False) for k, p in enumerate(pieces)]
    tail: list[str] = []
    for message in reversed(messages):
        if message.role != "user":
            break
        tail.append(message.content)
    if not tail:
        raise Invalid("without a chat template, the conversation must end with a user message")
    return [("\n".join(reversed(tail)), False)]


def render(ga: GenerativeAdapter, prompt: Prompt) -> list[tuple[str, bool]]:
    """The prompt in pieces, as render_chat gives them."""
    if prompt.messages is not None:
        return render_chat(ga.tokenizer, prompt.messages)
    if prompt.chat:
        return render_chat(ga.tokenizer, [Message("user", prompt.text or "")])
    return [(prompt.text or "", True)]


def encode(tokenizer: Any, pieces: Sequence[tuple[str, bool]]) -> list[int]:
    """Token ids of a rendered prompt: control tokens only where the template (or a raw prompt) has them.

    The text between two control tokens is tokenized as one piece with special-token strings as text, so user text
    cannot forge a turn, and a prompt without such strings in user text gets the ids of tokenizing it whole."""
    control = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids: list[int] = []
    run: list[str] = []  # text since the last control token

    def flush() -> None:
        text = "".join(run)
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
        run.clear()

    for text, trusted in pieces:
        if not trusted:
            run.append(text)
            continue
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = 0
        for token, (begin, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
            if token in control:
                run.append(text[start:begin])
                flush()
                ids.append(token)
                start = end
        run.append(text[start:])
    flush()
    return ids


def refuse_over(tokenizer: Any, text: str, limit: int, what: str) -> None:
    """Raise TooLarge when `text` certainly has more than `limit` tokens, tokenizing at most a bounded prefix.

    The prefix ends where a space follows a non-space, a pre-token boundary of byte-level BPE and SentencePiece
    tokenizers, so its tokens begin the text's: more than `limit` of them settle it, in the time of
    CHARS_PER_TOKEN · limit chars. A text this cannot refuse is tokenized in full by the caller, which checks the
    exact count (a text that fits must be tokenized anyway)."""
    budget = (limit + 1) * CHARS_PER_TOKEN
    if len(text) <= budget:
        return
    prefix = _LAST_WORD_END.match(text, 0, budget)
    if prefix is None:  # no word boundary in reach: leave it to the full count
        return
    if len(tokenizer(prefix.group(), add_special_tokens=False)["input_ids"]) > limit:
        raise TooLarge(f"the {what} has more than {limit} tokens, the limit")


# ---- the rows of the batch --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    prompt: Prompt
    state: ContextState | None
    sampling: Sampling
    on_text: Callable[[str], None] | None
    future: Future
    enqueued: float = field(default_factory=time.monotonic)
    ids: list[int] = field(default_factory=list)  # the prompt's tokens
    tokens: list[int] = field(default_factory=list)  # generated so far
    emitted: str = ""  # text handed to on_text so far
    generator: torch.Generator | None = None  # sampling's random numbers, when temperature > 0


@dataclass(eq=False)
class _StepsJob:
    steps: Iterator[Any]
    future: Future
    value: Any = None  # the last value yielded


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future


def _left_pad(tensor: Tensor, width: int, dim: int) -> Tensor:
    """`tensor` with zeros before its entries along `dim`, to `width` of them."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class _Prefill:
    """Requests joining the batch: their prompts, left-padded, through the model a chunk of columns per step."""

    def __init__(self, ga: GenerativeAdapter, rows: list[_Request], adapters: dict[str, Tensor] | None):
        self.rows = rows
        self.adapters = adapters
        self.ids, self.mask = ga.pad([r.ids for r in rows], side="left")  # (M, T)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers them
        self.cache = DynamicCache()
        self.done = 0  # columns run

    def step(self, ga: GenerativeAdapter, columns: int) -> Tensor | None:
        """Run the next `columns` columns; after the last ones, the next-token logits (M, vocab)."""
        end = min(self.done + columns, self.ids.shape[1])
        with ga.injector.activate(self.adapters):
            out = ga.model(
                input_ids=self.ids[:, self.done : end],
                attention_mask=self.mask[:, :end],
                position_ids=self.positions[:, self.done : end],
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.done = end
        return out.logits[:, -1].float() if end == self.ids.shape[1] else None


class _Batch:
    """The running rows and their KV cache: cache layers (N, heads, T, d) and mask (N, T), rows left-padded."""

    def __init__(self) -> None:
        self.rows: list[_Request] = []
        self.cache: DynamicCache | None = None
        self.mask: Tensor | None = None
        self.adapters: dict[str, Tensor] | None = None

    def join(self, cache: DynamicCache, mask: Tensor, rows: list[_Request]) -> None:
        """Append rows whose prompts ran in `cache` (their mask (M, T')), padding the shorter side on the left."""
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, -1), _left_pad(mask, width, -1)])
        self.rows = self.rows + rows

    def leave(self, keep: list[int]) -> None:
        """Keep only the rows `keep`."""
        self.rows = [self.rows[i] for i in keep]
        self.cache, self.mask = _select(self.cache, self.mask, keep) if keep else (None, None)


def _select(cache: DynamicCache, mask: Tensor, keep: list[int]) -> tuple[DynamicCache, Tensor]:
    """The rows `keep` of a cache and its mask, without the leading columns that no kept row uses."""
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    first = int(mask.any(0).nonzero()[0])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, first:]
        layer.values = layer.values.index_select(0, index)[:, :, first:]
    return cache, mask[:, first:]


# ---- the worker -------------------------------------------------------------------------------------------


class ModelWorker:
    """The single thread that owns the model; submit work, get concurrent.futures.Future back."""

    def __init__(
        self,
        ga: GenerativeAdapter,
        max_batch: int = 16,
        batch_wait_s: float = 0.005,
        max_queue: int = 1024,
        max_prompt_tokens: int = 4096,
        prefill_chunk_tokens: int = 256,
    ):
        self.ga = ga
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.max_prompt_tokens = max_prompt_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.window = getattr(ga.model.config, "max_position_embeddings", None)
        eos = ga.model.generation_config.eos_token_id  # what ends an answer in ga.generate
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batch_sizes: Counter[int] = Counter()  # decode steps by the number of rows they ran
        # the model thread's own
        self._pending: deque[_Request] = deque()  # prepared, waiting for a row
        self._joining: _Prefill | None = None
        self._batch = _Batch()
        self._jobs: deque[_StepsJob] = deque()
        self._owed = 0.0  # seconds step jobs ran minus seconds generation ran, while both had work

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="genadapter-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail the work in hand and the queued jobs with 503 after the current step, join the thread."""
        if self._thread is None:
            return
        self._stopping = True
        while True:  # make room for the wake-up marker, failing what we take out
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
        """Run fn() on the model thread, between two decode steps."""
        future: Future[T] = Future()
        self._put(_CallJob(fn, future))
        return future

    def run_steps(self, steps: Iterator[T]) -> Future[T]:
        """Run `steps` on the model thread, a step at a time between decode steps; the future gets the last value
        it yields (None if none), and cancelling it drops the job. Each step should be short: it holds the thread."""
        future: Future[T] = Future()
        self._put(_StepsJob(steps, future))
        return future

    def generate(
        self,
        prompt: Prompt,
        state: ContextState | None,
        sampling: Sampling,
        on_text: Callable[[str], None] | None = None,
    ) -> Future[Generation]:
        """Answer `prompt` with `state`'s adapter (None: the base model). `on_text(delta)` is called on the model
        thread with each new piece of the answer; the pieces add up to `Generation.text`. An exception from it fails
        the request, and cancelling the future takes it out of the batch (e.g. its client went away)."""
        future: Future[Generation] = Future()
        self._put(_Request(prompt, state, sampling, on_text, future))
        return future

    def stats(self) -> dict:
        """Queued jobs, and decode steps by their number of rows ("batches" are decode steps)."""
        sizes = dict(self.batch_sizes)  # one copy, while the model thread goes on counting
        return {
            "queued": self._queue.qsize(),
            "batches": sum(sizes.values()),
            "rows": sum(size * n for size, n in sizes.items()),
            "max_batch_size": max(sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
        }

    # ---- the model thread -----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while not self._stopping:
                try:
                    self._iteration()
                except Exception as exc:  # a bug, or out of memory: fail the requests in hand, not the thread
                    self._fail_rows(self._in_hand(), exc)
                    self._joining, self._batch = None, _Batch()
        for job in [*self._pending, *self._in_hand(), *self._jobs]:
            self._fail(job)
        while True:
            try:
                self._fail(self._queue.get_nowait())
            except queue.Empty:
                return

    def _iteration(self) -> None:
        """Take new work, then take turns by time: generation (a prefill chunk and/or a decode step) while step
        jobs are ahead of it, else a job's step."""
        self._take()
        self._admit()
        generating = self._generating()
        if not (generating and self._jobs):
            self._owed = 0.0
        if generating and (self._owed > 0 or not self._jobs):
            started = time.perf_counter()
            if self._joining is not None:
                self._prefill_step()
            if self._batch.rows:
                self._decode_step()
            self._owed -= time.perf_counter() - started
        elif self._jobs:
            self._job_step()

    def _in_hand(self) -> list[_Request]:
        """The requests that have joined the batch or are joining it."""
        return self._batch.rows + (self._joining.rows if self._joining is not None else [])

    def _generating(self) -> bool:
        return bool(self._pending or self._joining or self._batch.rows)

    def _take(self) -> None:
        """Take queued jobs while there is room for a joining group: calls run at once, step jobs line up,
        requests are prepared. Blocks while there is nothing to do; an idle model's first request waits up to
        batch_wait_s for company."""
        while len(self._pending) < self.max_batch and not self._stopping:
            if self._joining is not None or self._batch.rows or self._jobs:
                wait = 0.0
            elif self._pending:
                wait = self._pending[0].enqueued + self.batch_wait_s - time.monotonic()
            else:
                wait = None
            try:
                job = self._queue.get(timeout=wait) if wait is None or wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _CallJob):
                self._run_call(job)
            elif isinstance(job, _StepsJob):
                self._jobs.append(job)
            elif isinstance(job, _Request) and self._prepare(job):
                self._pending.append(job)

    def _prepare(self, job: _Request) -> bool:
        """Tokenize the prompt, check the limits and make the adapter: a request that cannot run fails alone,
        before it can join the batch."""
        if job.future.cancelled():
            return False
        try:
            pieces = render(self.ga, job.prompt)
            refuse_over(self.ga.tokenizer, "".join(text for text, _ in pieces), self.max_prompt_tokens, "prompt")
            job.ids = encode(self.ga.tokenizer, pieces)
            if not job.ids:
                raise Invalid("the prompt is empty")
            if len(job.ids) > self.max_prompt_tokens:
                raise TooLarge(f"the prompt has {len(job.ids)} tokens; the limit is {self.max_prompt_tokens}")
            new = job.sampling.max_new_tokens
            if self.window and len(job.ids) + new > self.window:
                raise TooLarge(
                    f"the prompt ({len(job.ids)} tokens) plus max_new_tokens ({new}) "
                    f"exceeds the model's window of {self.window} tokens"
                )
            if job.state is not None:
                self.ga.adapter_factors(job.state)  # cached on the state for the batch's stacking
            if job.sampling.temperature > 0:
                job.generator = torch.Generator(self.ga.device)
                if job.sampling.seed is None:
                    job.generator.seed()
                else:
                    job.generator.manual_seed(job.sampling.seed)
        except Exception as exc:
            _log_failure(exc)
            _resolve(job.future, error=exc)
            return False
        return True

    def _adapters(self, rows: list[_Request]) -> dict[str, Tensor] | None:
        """The rows' adapters stacked (N, ...), one for all when they share a state, None when none has one."""
        states = [r.state for r in rows]
        if all(s is None for s in states):
            return None
        return self.ga.batch_adapters(self.ga.single_state(states) or states, len(states))

    def _admit(self) -> None:
        """Start prefilling the pending requests that fit into the batch (one joining group at a time)."""
        room = self.max_batch - len(self._batch.rows)
        if self._joining is not None or not self._pending or room <= 0:
            return
        group = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        group = [r for r in group if not r.future.cancelled()]
        if not group:
            return
        try:
            self._joining = _Prefill(self.ga, group, self._adapters(group))
        except Exception as exc:
            self._fail_rows(group, exc)

    def _prefill_step(self) -> None:
        group = self._joining
        try:
            logits = group.step(self.ga, self.prefill_chunk_tokens)
        except Exception as exc:
            self._joining = None
            self._fail_rows(group.rows, exc)
            return
        if logits is None:
            return
        self._joining = None
        keep = [i for i, token in enumerate(self._pick(group.rows, logits)) if not self._advance(group.rows[i], token)]
        if keep:
            self._batch.join(*_select(group.cache, group.mask, keep), [group.rows[i] for i in keep])
            self._batch.adapters = self._adapters(self._batch.rows)

    def _decode_step(self) -> None:
        batch, device = self._batch, self.ga.device
        rows = batch.rows
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=device)  # (N, 1)
        positions = torch.tensor([[len(r.ids) + len(r.tokens) - 1] for r in rows], device=device)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], 1)  # (N, T + 1)
        with self.ga.injector.activate(batch.adapters):
            out = self.ga.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch.cache, use_cache=True
            )
        batch.mask = mask
        self.batch_sizes[len(rows)] += 1
        tokens = self._pick(rows, out.logits[:, -1].float())
        keep = [i for i, token in enumerate(tokens) if not self._advance(rows[i], token)]
        if len(keep) < len(rows):
            batch.leave(keep)
            batch.adapters = self._adapters(batch.rows)

    def _pick(self, rows: list[_Request], logits: Tensor) -> list[int]:
        """Each row's next token from its logits (N, vocab): greedy, or sampled with its own generator."""
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            sampling = row.sampling
            if sampling.temperature == 0:
                continue
            probs = torch.softmax(logits[i] / sampling.temperature, -1)
            if sampling.top_p < 1:  # keep the most likely tokens until their mass reaches top_p
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p
                probs = probs.scatter(0, order[outside], 0.0)
            tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _advance(self, row: _Request, token: int) -> bool:
        """Add a token to a row, hand on its settled text, and resolve it if it is done; True when it left."""
        if row.future.cancelled():  # its caller gave up
            return True
        row.tokens.append(token)
        sampling = row.sampling
        finish = "stop" if token in self.eos else "length" if len(row.tokens) >= sampling.max_new_tokens else None
        if finish is None and not sampling.stop and row.on_text is None:
            return False
        text = self.ga.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=None)
        if cut is not None:
            text, finish = text[:cut], "stop"
        text = text.lstrip()  # as ga.generate strips its answers
        text = text.rstrip() if finish else _settled(text, sampling.stop)
        try:
            if row.on_text is not None and len(text) > len(row.emitted):
                row.on_text(text[len(row.emitted) :])
                row.emitted = text
        except Exception as exc:
            _resolve(row.future, error=exc)
            return True
        if finish:
            _resolve(row.future, Generation(text, len(row.ids), len(row.tokens), finish))
        return finish is not None

    def _job_step(self) -> None:
        """Run a step of the next step job; while requests are generating, they are owed as much time."""
        job = self._jobs.popleft()
        if job.future.cancelled():  # its caller gave up: drop it
            return
        started = time.perf_counter()
        try:
            job.value = next(job.steps)
        except StopIteration:
            _resolve(job.future, job.value)
        except Exception as exc:
            _log_failure(exc)
            _resolve(job.future, error=exc)
        else:
            self._jobs.append(job)
        if self._generating():
            self._owed += time.perf_counter() - started

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.fn())
        except Exception as exc:
            job.future.set_exception(exc)

    @staticmethod
    def _fail_rows(rows: list[_Request], exc: Exception) -> None:
        _log_failure(exc)
        for row in rows:
            _resolve(row.future, error=exc)

    @staticmethod
    def _fail(job: Any) -> None:
        """Fail a job the thread will not finish with 503."""
        if isinstance(job, _Request | _StepsJob | _CallJob):
            _resolve(job.future, error=Unavailable("the server is shutting down"))


def _resolve(future: Future, result: Any = None, error: Exception | None = None) -> None:
    """Settle a future unless it is settled or cancelled. Futures of requests and step jobs stay pending while
    their work runs, so that cancelling one (a timeout, a client gone) takes its work off the thread."""
    if not future.done() and future.set_running_or_notify_cancel():
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing answer that the next tokens cannot change: without an unfinished character at the
    end, the start of a stop string there, or trailing whitespace (the finished answer is stripped). Decoding
    replaces the bytes of an unfinished character by one U+FFFD; the ones before it stay as they are."""
    text = text.removesuffix("\ufffd")
    hold = max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - hold].rstrip()


def _log_failure(exc: Exception) -> None:
    if not isinstance(exc, GenAdapterError | ServeError):  # those answer the client; anything else is a bug
        log.error("generation failed", exc_info=exc)
