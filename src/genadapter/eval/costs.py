"""Cost accounting: wall time, peak memory, bytes kept per context and FLOP estimates.

Memory is the **peak resident set size above the RSS at the start of the measured call**, sampled every
10 ms by a background thread with psutil (torch's CPU allocations included; short spikes between samples
can be missed). On CUDA the peak of `torch.cuda.max_memory_allocated` above the start is recorded too.

FLOPs are estimates, not counts: a forward pass costs 2·N FLOPs per token, N = the base model's
non-embedding parameters plus the output projection (d·V; counted even when tied to the embeddings);
attention's context-length term is left out. Training a LoRA costs ≈ 3× a forward per token (forward,
backward through the activations, the small LoRA weight gradients).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from torch import nn

MEMORY_METHOD = (
    "peak RSS above the RSS at the start of the call, sampled every 10 ms with psutil "
    "(includes torch CPU allocations); on CUDA also torch.cuda.max_memory_allocated above the start"
)
FLOPS_METHOD = (
    "estimates: forward = 2·N·tokens with N = non-embedding parameters + output projection (attention's "
    "length term left out); LoRA fine-tuning = 3·forward per token per epoch; absorb = frozen forward over "
    "the context (decoder only) + the generator's key/value projections and state products + the next-token "
    "memory's keys, sums and (error targets) vocabulary projection and expected embedding; answering = "
    "2·N·(prompt + answer tokens) per question (nominal: no prefix caching), + the adapter's low-rank "
    "products per token for genadapter"
)


class Meter:
    """`with Meter() as m: ...` then m.seconds, m.peak_mib (RSS) and m.cuda_peak_mib."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.seconds = 0.0
        self.peak_mib = 0.0
        self.cuda_peak_mib: float | None = None

    def __enter__(self) -> Meter:
        import psutil

        self._process = psutil.Process()
        self._start_rss = self._peak = self._process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self._cuda_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self._started = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak_mib = (torch.cuda.max_memory_allocated() - self._cuda_start) / 2**20
        self.seconds = time.perf_counter() - self._started
        self._done.set()
        self._thread.join()
        self._peak = max(self._peak, self._process.memory_info().rss)
        self.peak_mib = (self._peak - self._start_rss) / 2**20


@dataclass(frozen=True)
class ModelCosts:
    """Shape facts of the base LM that the cost formulas need."""

    params_per_token: int  # N: non-embedding parameters + output projection
    decoder_params: int  # non-embedding parameters (what a decoder-only forward uses)
    kv_bytes_per_token: int  # 2 · layers · kv_heads · head_dim · dtype bytes
    vocab_size: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelCosts:
        cfg = model.config.get_text_config()
        embedding = model.get_input_embeddings()
        embed_params = sum(p.numel() for p in embedding.parameters())
        total = sum(p.numel() for p in model.parameters())
        tied = getattr(cfg, "tie_word_embeddings", False)
        head = model.get_output_embeddings()
        head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
        decoder = total - embed_params - (0 if tied else head_params)
        head_flops = cfg.hidden_size * cfg.vocab_size
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype_bytes = next(model.parameters()).element_size()
        return cls(
            params_per_token=decoder + head_flops,
            decoder_params=decoder,
            kv_bytes_per_token=2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes,
            vocab_size=cfg.vocab_size,
        )

    def kv_cache_bytes(self, tokens: int) -> int:
        return self.kv_bytes_per_token * tokens

    def forward_flops(self, tokens: int) -> float:
        return 2.0 * self.params_per_token * tokens

    def train_flops(self, tokens: int, epochs: int) -> float:
        return 3.0 * self.forward_flops(tokens) * epochs


def generator_flops(generator, tokens: int, vocab_size: int) -> tuple[float, float]:
    """(absorb FLOPs beyond the frozen decoder's forward for `tokens` context tokens, adapter FLOPs per answer token),
    the next-token memory included: its keys P x, its sums C and G, and with "error" targets the vocabulary
    projection and the expected next-token embedding (2 · V · d each per token, V = `vocab_size`)."""
    r1, r2 = generator.config.key_dim, generator.config.value_dim
    absorb = adapter = 0.0
    for name in generator.module_names:
        block, spec = generator.block(name), generator.targets[name]
        hidden = block.A2.shape[1]
        absorb += 2.0 * tokens * (hidden * (r1 + r2) + r1 * r2)
        adapter += 2.0 * (spec.in_features * r1 + r1 * spec.out_features)
    memory = generator.memory
    if memory is not None:
        for name in memory.module_names:
            k, d_in, d_out = memory.key_width(name), memory.in_features[name], memory.out_features[name]
            m = memory.value_width(name)
            keys = d_in * k if memory.projection(name) is not None else 0
            values = d_out * m if memory.value_projection(name) is not None else 0
            absorb += 2.0 * tokens * (keys + values + m * k + k * k)
            adapter += 2.0 * (keys + k * d_out)
        if generator.config.memory_targets == "error":
            absorb += 2.0 * tokens * 2 * vocab_size * generator.hidden_size
    return absorb, adapter
