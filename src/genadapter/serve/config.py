"""Limits and batching settings of the HTTP service (no web dependencies: the CLI may import it cheaply)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import GenAdapterError


@dataclass
class ServeConfig:
    """Every bound the service enforces; defaults suit the embedded SmolLM2 on a CPU."""

    max_body_bytes: int = 4 * 2**20  # larger request bodies get 413 before any parsing
    max_context_tokens: int = 32768  # tokens of one absorb/forget/create text; more gets 400
    max_prompt_tokens: int = 4096  # tokens of one rendered prompt; more gets 400
    max_new_tokens: int = 512  # upper bound of max_new_tokens / max_tokens; more gets 400
    default_new_tokens: int = 64  # when a chat request names no max_tokens
    max_batch: int = 16  # generation requests grouped into one model call (1 = one at a time)
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 1024  # model jobs waiting; beyond that requests get 503
    cache_bytes: int = 512 * 2**20  # LRU of deserialised context states, by tensor bytes
    absorb_batch_size: int = 8  # chunks per frozen forward when absorbing
    absorb_slice_chunks: int = 1  # the server's absorb forwards (at most absorb_batch_size), one per decode step
    prefill_chunk_tokens: int = 256  # prompt tokens per row prefilled between two decode steps
    request_timeout_s: float = 600.0  # a request waiting longer for the model gets 503
    max_contexts: int = 100  # contexts per API key, unless `keys create` gave the key its own; more gets 429
    max_stored_bytes: int = 2 * 2**30  # state blobs + ledger texts per key (~280 shipped contexts), likewise; 429
    half_states: bool = True  # store states at half precision: half the bytes (ContextState.to_bytes)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if f.name == "batch_wait_ms":
                if value < 0:
                    raise GenAdapterError("batch_wait_ms must not be negative")
            elif value <= 0:
                raise GenAdapterError(f"{f.name} must be positive")
        if self.default_new_tokens > self.max_new_tokens:
            raise GenAdapterError("default_new_tokens must not exceed max_new_tokens")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ServeConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise GenAdapterError(f"unknown serve config keys: {sorted(unknown)}")
        return cls(**data)
