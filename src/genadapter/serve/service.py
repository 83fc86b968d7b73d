"""What the endpoints do, free of HTTP: contexts in the store, model work on the model thread."""

from __future__ import annotations

import concurrent.futures
import io
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence

from ..adapter import GenerativeAdapter
from ..errors import StateFileError
from ..state import ContextState
from .batcher import Generation, Message, ModelWorker, Prompt, Sampling, refuse_over
from .cache import StateCache
from .config import ServeConfig
from .errors import Conflict, Invalid, NotFound, ServeError, TooLarge, Unavailable, VersionConflict
from .store import Caller, ContextRecord, ContextStore, LedgerItem, digest, is_valid_id, new_id

MAX_WRITE_TRIES = 8  # compare-and-swap attempts of one absorb/forget against concurrent writers


def _short(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def _unknown(context_id: str) -> NotFound:
    """The one answer for a context that does not exist or belongs to another key: the two look the same."""
    return NotFound(f"no context with id {_short(context_id)!r}")


def remembered_text(messages: Sequence[Message], answer: str | None = None) -> str:
    """What a chat with `remember` absorbs: its user turns, then the answer if given ("exchange"), one per line."""
    parts = [m.content for m in messages if m.role == "user"] + ([answer] if answer is not None else [])
    return "\n".join(p for p in parts if p.strip())


class Service:
    def __init__(self, ga: GenerativeAdapter, store: ContextStore, config: ServeConfig):
        self.ga = ga
        self.store = store
        self.config = config
        self.cache = StateCache(config.cache_bytes)
        self.worker = ModelWorker(
            ga,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            max_queue=config.max_queue,
            max_prompt_tokens=config.max_prompt_tokens,
            prefill_chunk_tokens=config.prefill_chunk_tokens,
        )

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def wait(self, future: concurrent.futures.Future):
        try:
            return future.result(timeout=self.config.request_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Unavailable("timed out waiting for the model; retry later") from None

    # ---- records and states ---------------------------------------------------------------------

    def compatible(self, record: ContextRecord) -> bool:
        return record.generator_fingerprint == self.ga.fingerprint and record.base_model == self.ga.base_name

    def _check(self, record: ContextRecord) -> None:
        if not self.compatible(record):
            raise Conflict(
                f"context {record.id} was made by generator {record.generator_fingerprint} on "
                f"{record.base_model}; this server runs generator {self.ga.fingerprint} on {self.ga.base_name}"
            )

    def meta(self, context_id: str, caller: Caller) -> ContextRecord:
        """The record of a context of the caller's; every other id, stored or not, is unknown."""
        record = self.store.get_meta(context_id) if is_valid_id(context_id) else None
        if record is None or record.owner != caller.name:
            raise _unknown(context_id)
        return record

    def load(self, context_id: str, caller: Caller) -> tuple[ContextRecord, ContextState]:
        """The record and state of a context of the caller's that this server's generator can use (cached by
        version)."""
        record = self.meta(context_id, caller)
        self._check(record)
        state = self.cache.get(context_id, record.version)
        if state is None:
            stored = self.store.get(context_id)
            if stored is None:
                raise _unknown(context_id)
            record = stored.record
            self._check(record)
            try:
                state = stored.state()
            except StateFileError as exc:
                raise ServeError(f"the stored state of context {context_id} is unreadable") from exc
            self.cache.put(context_id, record.version, state)
        return record, state

    def state_bytes(self, context_id: str, caller: Caller) -> bytes:
        self.meta(context_id, caller)
        stored = self.store.get(context_id)
        if stored is None:
            raise _unknown(context_id)
        return stored.data

    def list(self, caller: Caller, limit: int, offset: int) -> list[ContextRecord]:
        return self.store.list(caller.name, limit, offset)

    def ledger(self, context_id: str, caller: Caller, limit: int, offset: int) -> list[LedgerItem]:
        self.meta(context_id, caller)
        return self.store.ledger(context_id, limit, offset)

    # ---- changes --------------------------------------------------------------------------------

    def absorb_text(self, text: str) -> ContextState:
        """The state of `text`, made on the model thread a forward of absorb_slice_chunks chunks at a time between
        decode steps; refuses texts over max_context_tokens."""
        limit = self.config.max_context_tokens
        chunks = min(self.config.absorb_batch_size, self.config.absorb_slice_chunks)

        def job() -> Iterator[ContextState]:
            refuse_over(self.ga.tokenizer, text, limit, "text")
            documents = self.ga.tokenize_context(text)
            tokens = sum(len(d) for d in documents)
            if tokens == 0:
                raise Invalid("the text is empty: nothing to absorb")
            if tokens > limit:
                raise TooLarge(f"the text has {tokens} tokens; the limit per request is {limit}")
            yield from self.ga.absorb_steps(documents[0], batch_size=chunks)

        return self.wait(self.worker.run_steps(job()))

    def _precheck(self, caller: Caller, add_contexts: int, text: str) -> None:
        """Refuse before the model work what the quota will refuse anyway (the store checks again as it writes)."""
        caller.quota.check(caller.name, self.store.usage(caller.name), add_contexts, len(text.encode("utf-8")))

    def create(self, caller: Caller, text: str) -> tuple[ContextRecord, LedgerItem]:
        """A new context of the caller's holding `text`, the first item of its ledger."""
        self._precheck(caller, 1, text)
        state = self.store.as_stored(self.absorb_text(text))
        context_id = new_id()
        item = LedgerItem.new(context_id, "create", text, state.num_tokens)
        record = self.store.create(context_id, caller.name, state, item, caller.quota)
        self.cache.put(context_id, record.version, state)
        return record, item

    def absorb(
        self, context_id: str, caller: Caller, text: str, source: str = "absorb"
    ) -> tuple[ContextRecord, LedgerItem]:
        """state += absorb(text), and the text becomes a ledger item."""
        self.check_absorb(context_id, caller, text)
        delta = self.absorb_text(text)
        item = LedgerItem.new(context_id, source, text, delta.num_tokens)
        return self._write(context_id, caller, delta, add=item), item

    def check_absorb(self, context_id: str, caller: Caller, text: str) -> None:
        """Raise what absorbing `text` would be refused for (unknown or incompatible context, quota), before any
        model work: a chat that remembers checks this before it answers, so a refusal never costs an answer."""
        self._check(self.meta(context_id, caller))
        self._precheck(caller, 0, text)

    def forget(self, context_id: str, caller: Caller, item_id: str | None, text: str | None) -> ContextRecord:
        """state -= absorb(text of one ledger item), named by its id or by its exact text (the newest such item).
        Anything else is refused: subtracting a text the context never absorbed would corrupt the state."""
        self._check(self.meta(context_id, caller))
        item = self.store.find_item(context_id, item_id, None if text is None else digest(text))
        if item is None:
            named = "this text" if item_id is None else f"the id {_short(item_id)!r}"
            raise Conflict(
                f"context {context_id} has no ledger item with {named}: forget removes only what the context "
                f"absorbed, as GET /v1/contexts/{context_id}/ledger lists it"
            )
        return self._write(context_id, caller, self.absorb_text(item.text), remove=item.id)

    def _write(
        self,
        context_id: str,
        caller: Caller,
        delta: ContextState,
        add: LedgerItem | None = None,
        remove: str | None = None,
    ) -> ContextRecord:
        """state + delta with the item `add`, or state - delta without the item `remove`: compare-and-swap on the
        version, retried against concurrent writers. Adding counts against the caller's quota."""
        for _ in range(MAX_WRITE_TRIES):
            record, state = self.load(context_id, caller)
            new = self.store.as_stored(state - delta if remove is not None else state + delta)  # none left: zeros
            quota = caller.quota if add is not None else None
            try:
                record = self.store.update(context_id, new, record.version, add=add, remove=remove, quota=quota)
            except VersionConflict:
                continue
            self.cache.put(context_id, record.version, new)
            return record
        raise Conflict(f"context {context_id} is being changed by other requests; retry")

    def delete(self, context_id: str, caller: Caller) -> None:
        self.meta(context_id, caller)
        if not self.store.delete(context_id):
            raise _unknown(context_id)
        self.cache.discard(context_id)

    def peft_zip(self, context_id: str, caller: Caller) -> bytes:
        """The context's adapter as a zipped PEFT LoRA directory, made in memory on the model thread."""
        _, state = self.load(context_id, caller)

        def job() -> bytes:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in self.ga.peft_files(state).items():
                    archive.writestr(name, data)
            return buffer.getvalue()

        return self.wait(self.worker.call(job))

    # ---- generation -----------------------------------------------------------------------------

    def check_new_tokens(self, max_new_tokens: int, param: str = "max_new_tokens") -> None:
        if max_new_tokens > self.config.max_new_tokens:
            limit = self.config.max_new_tokens
            raise Invalid(f"{param} is {max_new_tokens}; this server allows at most {limit}", param=param)

    def states(self, context_ids: Iterable[str | None], caller: Caller) -> dict[str, ContextState]:
        return {cid: self.load(cid, caller)[1] for cid in dict.fromkeys(context_ids) if cid is not None}

    def submit(
        self,
        prompts: list[Prompt],
        states: list[ContextState | None],
        sampling: Sampling,
        on_text: Callable[[str], None] | None = None,
    ) -> list[concurrent.futures.Future[Generation]]:
        """One request per prompt; `on_text` (for one prompt) gets its answer's pieces as they are decoded."""
        futures = []
        try:
            for prompt, state in zip(prompts, states, strict=True):
                futures.append(self.worker.generate(prompt, state, sampling, on_text))
        except Unavailable:
            for future in futures:
                future.cancel()
            raise
        return futures
