"""What the endpoints do, free of HTTP: contexts in the store, model work on the model thread."""

from __future__ import annotations

import concurrent.futures
import io
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError, StateFileError
from ..state import ContextState
from .batcher import Generation, ModelWorker, Prompt
from .cache import StateCache
from .config import ServeConfig
from .errors import Conflict, Invalid, NotFound, ServeError, TooLarge, Unavailable, VersionConflict
from .store import ContextRecord, ContextStore, is_valid_id, new_id

MAX_WRITE_TRIES = 8  # compare-and-swap attempts of one absorb/forget against concurrent writers


def _short(value: str, limit: int = 64) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


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

    def meta(self, context_id: str) -> ContextRecord:
        record = self.store.get_meta(context_id) if is_valid_id(context_id) else None
        if record is None:
            raise NotFound(f"no context with id {_short(context_id)!r}")
        return record

    def load(self, context_id: str) -> tuple[ContextRecord, ContextState]:
        """The record and state of a context this server's generator can use (cached by version)."""
        record = self.meta(context_id)
        self._check(record)
        state = self.cache.get(context_id, record.version)
        if state is None:
            stored = self.store.get(context_id)
            if stored is None:
                raise NotFound(f"no context with id {context_id!r}")
            record = stored.record
            self._check(record)
            try:
                state = stored.state()
            except StateFileError as exc:
                raise ServeError(f"the stored state of context {context_id} is unreadable") from exc
            self.cache.put(context_id, record.version, state)
        return record, state

    def state_bytes(self, context_id: str) -> bytes:
        stored = self.store.get(context_id) if is_valid_id(context_id) else None
        if stored is None:
            raise NotFound(f"no context with id {_short(context_id)!r}")
        return stored.data

    def list(self, limit: int, offset: int) -> list[ContextRecord]:
        return self.store.list(limit, offset)

    # ---- changes --------------------------------------------------------------------------------

    def absorb_text(self, text: str) -> ContextState:
        """The state of `text`, made on the model thread; refuses texts over max_context_tokens."""
        limit = self.config.max_context_tokens

        def job() -> ContextState:
            documents = self.ga.tokenize_context(text)
            tokens = sum(len(d) for d in documents)
            if tokens == 0:
                raise Invalid("the text is empty: nothing to absorb")
            if tokens > limit:
                raise TooLarge(f"the text has {tokens} tokens; the limit per request is {limit}")
            return self.ga.absorb(documents[0], batch_size=self.config.absorb_batch_size, progress=False)

        return self.wait(self.worker.call(job))

    def create(self, text: str) -> ContextRecord:
        state = self.absorb_text(text)
        context_id = new_id()
        record = self.store.put(context_id, state, None)
        self.cache.put(context_id, record.version, state)
        return record

    def change(self, context_id: str, text: str, forget: bool = False) -> ContextRecord:
        """state += absorb(text), or state -= absorb(text) to remove a text absorbed before."""
        self._check(self.meta(context_id))  # fail fast, before the model work
        delta = self.absorb_text(text)
        for _ in range(MAX_WRITE_TRIES):
            record, state = self.load(context_id)
            if not forget:
                new = state + delta
            elif delta.num_tokens > state.num_tokens:
                raise Conflict(
                    f"cannot forget a text of {delta.num_tokens} tokens: context {context_id} holds only "
                    f"{state.num_tokens}; forget removes only texts absorbed before"
                )
            else:
                new = state - delta
                if new.num_tokens == 0:  # everything forgotten: exact zeros, not fp32 leftovers
                    new.sums = {k: torch.zeros_like(v) for k, v in new.sums.items()}
            try:
                record = self.store.put(context_id, new, record.version)
            except VersionConflict:
                continue
            self.cache.put(context_id, record.version, new)
            return record
        raise Conflict(f"context {context_id} is being changed by other requests; retry")

    def delete(self, context_id: str) -> None:
        if not (is_valid_id(context_id) and self.store.delete(context_id)):
            raise NotFound(f"no context with id {_short(context_id)!r}")
        self.cache.discard(context_id)

    def peft_zip(self, context_id: str) -> bytes:
        """The context's adapter as a zipped PEFT LoRA directory (made on the model thread)."""
        _, state = self.load(context_id)

        def job() -> bytes:
            with tempfile.TemporaryDirectory(prefix="genadapter-peft-") as tmp:
                directory = Path(tmp) / "adapter"
                try:
                    self.ga.export_peft(state, directory)
                except GenAdapterError as exc:  # e.g. no space left: the server's problem, not the client's
                    raise ServeError(f"cannot export the adapter: {exc}") from exc
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                    for path in sorted(directory.iterdir()):
                        archive.write(path, path.name)
                return buffer.getvalue()

        return self.wait(self.worker.call(job))

    # ---- generation -----------------------------------------------------------------------------

    def check_new_tokens(self, max_new_tokens: int) -> None:
        if max_new_tokens > self.config.max_new_tokens:
            limit = self.config.max_new_tokens
            raise Invalid(f"max_new_tokens is {max_new_tokens}; this server allows at most {limit}")

    def states(self, context_ids: Iterable[str | None]) -> dict[str, ContextState]:
        return {cid: self.load(cid)[1] for cid in dict.fromkeys(context_ids) if cid is not None}

    def submit(
        self, prompts: list[Prompt], states: list[ContextState | None], max_new_tokens: int
    ) -> list[concurrent.futures.Future[Generation]]:
        futures = []
        try:
            for prompt, state in zip(prompts, states, strict=True):
                futures.append(self.worker.generate(prompt, state, max_new_tokens))
        except Unavailable:
            for future in futures:
                future.cancel()
            raise
        return futures
