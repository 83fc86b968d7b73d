"""Next-token memory: a closed-form, training-free write of a context's next-token associations (not in the paper).

For an adapted linear y = W x in one of the last `memory_layers` layers, while the frozen LM reads a context:
    k_t = P x_t (k,)   P: random (k × d_in), fixed or learned (memory_learned_keys); the identity when memory_keys = 0
    e_t = E[token t+1] (d_out,)   the output embedding of the token that came next (pairs stay within a chunk);
          with memory_targets = "error", minus Σ_v p_t(v) E[v], the embedding the frozen LM expected there
    state:  C = Σ_t e_t k_tᵀ (d_out × k),  G = Σ_t k_t k_tᵀ (k × k)   (sums: they add and subtract like S)
    ΔW = η · C (G + μ I + β Σ)⁻¹ P,  μ = λ · tr(G) / n_tokens,  Σ = mean k kᵀ over ordinary text (0 unless β > 0)
    with memory_values = m > 0, C = Σ_t (R e_t) k_tᵀ (m × k) and ΔW = η · Rᵀ C (G + μ I + β Σ)⁻¹ P, R random
    orthonormal rows scaled so that E[Rᵀ R] = I (m × d_out): a smaller state, whose pushes lean toward other tokens
i.e. the ridge-regression map from the context's module inputs to its next tokens. At a position whose module input
resembles one in the context, the residual stream is pushed toward the token that followed there. β Σ adds the cost
of the map's output on β tokens of ordinary text (β E‖W k‖² over it): directions every text uses are pushed less,
so new text the model reads or writes is disturbed less. The "error" targets
make it a delta rule, as one gradient step of the next-token loss through the output embedding would: tokens the LM
already predicted add nothing, so the write keeps what is specific to the text. Why a memory at all: the trained
generator writes little that is specific to a context, while this write, with no training, makes a text's own adapter
read it far better than another text's (docs/experiments/ has the measurements, and what it costs). With learned
keys, the loss reaches P through both the write (C, G) and the read (ΔW x = η C (G + μI)⁻¹ P x): training chooses
what the least-squares write keys on, while the write itself stays closed-form and additive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .config import GeneratorConfig
from .errors import GenAdapterError
from .ridge import solve_relative_ridge

_MEMORY_TAG = ":memory_"
BACKGROUND_PREFIX = "background_"  # buffer names of Σ, saved with a generator (as learned key projections are)


def memory_key(name: str, part: str) -> str:
    """State / adapter dict key of a memory part ('values' C, 'keys' G, or 'map' the solved W = η C (G + μI)⁻¹)."""
    return f"{name}{_MEMORY_TAG}{part}"


def is_memory_key(key: str) -> bool:
    return _MEMORY_TAG in key


class NextTokenMemory(nn.Module):
    """Which modules hold the memory, their key projections, and the write/solve/apply math."""

    def __init__(self, config: GeneratorConfig, in_features: dict[str, int], out_features: dict[str, int]):
        super().__init__()
        self.config = config
        self.in_features, self.out_features = dict(in_features), dict(out_features)
        self._projection_names = {name: f"projection_{i}" for i, name in enumerate(self.in_features)}
        self._background_names = {name: f"{BACKGROUND_PREFIX}{i}" for i, name in enumerate(self.in_features)}
        self._value_projection_names = {name: f"value_projection_{i}" for i, name in enumerate(self.in_features)}
        narrowest = min(self.out_features.values(), default=0)
        if config.memory_values >= narrowest > 0:
            raise GenAdapterError(
                f"memory_values {config.memory_values} must be below the memory modules' output width {narrowest}"
            )
        value_rng = torch.Generator().manual_seed(config.seed + 2)  # its own stream: P's draws stay as they were
        for name, d_out in self.out_features.items():
            if config.memory_values:  # rebuilt from the seed, never saved
                # orthonormal rows scaled by √(d_out / m): E[Rᵀ R] = I, and a push's cross-talk is √((d_out − m) / m)
                # of its size, where Gaussian entries would give about √((d_out + 1) / m)
                gaussian = torch.randn(d_out, config.memory_values, generator=value_rng)
                projection = torch.linalg.qr(gaussian).Q.T * (d_out / config.memory_values) ** 0.5  # (m, d_out)
                self.register_buffer(self._value_projection_names[name], projection.contiguous(), persistent=False)
        rng = torch.Generator().manual_seed(config.seed + 1)
        for name, d_in in self.in_features.items():
            if config.memory_keys:  # a random (Johnson-Lindenstrauss) projection keeps the state small
                projection = torch.randn(config.memory_keys, d_in, generator=rng) / d_in**0.5
                if config.memory_learned_keys:  # a parameter: trained and saved with the generator
                    self.register_parameter(self._projection_names[name], nn.Parameter(projection))
                else:  # rebuilt from the seed, never saved
                    self.register_buffer(self._projection_names[name], projection, persistent=False)
            if config.memory_background:  # Σ: measured on text by `set_background`, saved with the generator
                k = self.key_width(name)
                self.register_buffer(self._background_names[name], torch.zeros(k, k))

    @property
    def module_names(self) -> list[str]:
        return list(self.in_features)

    def projection(self, name: str) -> Tensor | None:
        return getattr(self, self._projection_names[name]) if self.config.memory_keys else None

    def value_projection(self, name: str) -> Tensor | None:
        """R (m, d_out) of one module; None when the full targets are stored (memory_values 0)."""
        return getattr(self, self._value_projection_names[name]) if self.config.memory_values else None

    def background(self, name: str) -> Tensor:
        """Σ (k, k) of one module; only when memory_background > 0."""
        return getattr(self, self._background_names[name])

    @property
    def calibrated(self) -> bool:
        return all(bool(self.background(name).diagonal().sum() > 0) for name in self.module_names)

    @torch.no_grad()
    def set_background(self, key_grams: dict[str, Tensor], num_tokens: int) -> None:
        """Σ = (Σ_t k_t k_tᵀ) / num_tokens per module, from keys of ordinary text (see calibrate_memory)."""
        if not self.config.memory_background:
            raise GenAdapterError("memory_background is 0: this generator has no background term to calibrate")
        if num_tokens < 1:
            raise GenAdapterError("calibrating the memory needs at least one token of text")
        for name in self.module_names:
            self.background(name).copy_(key_grams[name] / num_tokens)

    def key_width(self, name: str) -> int:
        return self.config.memory_keys or self.in_features[name]

    def value_width(self, name: str) -> int:
        return self.config.memory_values or self.out_features[name]

    def empty_sums(self, rows: int | None = None, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Zero C and G per module, with a leading dimension of `rows` when given (one sum per context)."""
        lead = () if rows is None else (rows,)
        sums = {}
        for name in self.module_names:
            k = self.key_width(name)
            sums[memory_key(name, "values")] = torch.zeros(*lead, self.value_width(name), k, device=device)
            sums[memory_key(name, "keys")] = torch.zeros(*lead, k, k, device=device)
        return sums

    def keys(self, name: str, x: Tensor) -> Tensor:
        """k = P x: (..., d_in) -> (..., k)."""
        projection = self.projection(name)
        return x if projection is None else x @ projection.to(x.dtype).T

    @contextmanager
    def capturing(self, model: nn.Module) -> Iterator[dict[str, Tensor]]:
        """Inside the block, each forward through one of `model`'s memory modules stores its keys P x (N, T, k) in the
        yielded dict, by module name. The keys take the grad mode of the code entering the block, not that of the
        frozen forward inside it: learned keys get their gradient through the write."""
        keys: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        grad = torch.is_grad_enabled()

        def hook(name: str):
            def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
                with torch.set_grad_enabled(grad):
                    keys[name] = self.keys(name, args[0].float())

            return capture

        handles = [modules[name].register_forward_hook(hook(name)) for name in self.module_names]
        try:
            yield keys
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def targets(self, head: nn.Module, ids: Tensor, final_hidden: Tensor) -> Tensor:
        """What each position's key maps to, (N, T-1, d): the output embedding of the next token, minus with
        memory_targets = "error" the embedding the frozen LM expected there. head: the LM's output layer; ids (N, T):
        the chunks' tokens; final_hidden (N, T, d): the normed last hidden state the LM's softmax reads."""
        embeddings = head.weight  # (V, d)
        targets = embeddings[ids[:, 1:]]
        if self.config.memory_targets == "error":
            probs = torch.softmax(head(final_hidden[:, :-1]).float(), dim=-1)
            targets = targets.float() - probs @ embeddings.float()
        return targets

    @torch.no_grad()
    def calibrate(
        self,
        model: nn.Module,
        encode: Callable[[Sequence[Sequence[int]]], Tensor],
        batches: Iterable[Sequence[Sequence[int]]],
        num_tokens: int,
    ) -> None:
        """Measure Σ, the mean k kᵀ of the keys over ordinary text: `encode` runs the frozen LM over one batch of
        chunks and returns its padding mask (N, T); `num_tokens` is how many real tokens the batches hold."""
        grams = {
            name: torch.zeros(self.key_width(name), self.key_width(name), dtype=torch.float64)
            for name in self.module_names
        }
        for batch in batches:
            with self.capturing(model) as keys:
                mask = encode(batch)
            for name in self.module_names:
                real = keys[name][mask.bool()].double()  # (tokens, k)
                grams[name] += (real.T @ real).cpu()
        self.set_background(grams, num_tokens)

    def write(
        self,
        keys: dict[str, Tensor],
        targets: Tensor,
        mask: Tensor,
        sums: dict[str, Tensor],
        owner: Tensor | None = None,
    ) -> None:
        """Add the chunks' C and G to `sums`: all into one sum, or chunk n into row owner[n] of sums with a leading
        context dimension. keys (N, T, k) per module from `capturing`; targets (N, T-1, d_out): what position t
        maps to (built from token t + 1); mask (N, T): 1 on real tokens. A pair counts when both tokens are real."""
        pairs = (mask[:, :-1] * mask[:, 1:]).unsqueeze(-1).float()  # (N, T-1, 1)
        targets = targets.float() * pairs

        def add(key: str, per_chunk: Tensor) -> None:
            total = sums[key]
            if owner is None:
                total += per_chunk.sum(0).to(total.device)
            else:
                total.index_add_(0, owner.to(total.device), per_chunk.to(total.device))

        for name in self.module_names:
            k = keys[name][:, :-1] * pairs  # (N, T-1, k)
            projection = self.value_projection(name)
            stored = targets if projection is None else targets @ projection.to(targets.device).T  # (N, T-1, m)
            add(memory_key(name, "values"), torch.einsum("ntd,ntk->ndk", stored, k))
            add(memory_key(name, "keys"), torch.einsum("ntj,ntk->njk", k, k))

    def maps(self, sums: dict[str, Tensor], num_tokens: int | Tensor) -> dict[str, Tensor]:
        """W = η C (G + μI + βΣ)⁻¹ (..., d_out, k) per memory module (η Rᵀ C (…)⁻¹ with memory_values), solved in
        fp64; zero where no token was absorbed. num_tokens: an int, or one count per leading index of the sums."""
        beta = self.config.memory_background
        if beta and not self.calibrated:
            raise GenAdapterError(
                f"memory_background = {beta} weighs the key statistics of ordinary text, and this generator has none: "
                "measure them with GenerativeAdapter.calibrate_memory or `genadapter train calibrate`"
            )
        out = {}
        for name in self.module_names:
            values, keys = sums[memory_key(name, "values")], sums[memory_key(name, "keys")]
            background = beta * self.background(name).double() if beta else None
            solved = solve_relative_ridge(keys, values.mT, num_tokens, self.config.memory_ridge, background).mT
            projection = self.value_projection(name)
            if projection is not None:  # (..., m, k) -> (..., d_out, k)
                solved = projection.T.to(solved) @ solved
            out[memory_key(name, "map")] = (self.config.memory_scale * solved).to(values.dtype)  # η C (G + μI + βΣ)⁻¹
        return out

    def lora_factors(self, name: str, memory_map: Tensor) -> tuple[Tensor, Tensor]:
        """Exact factors (lora_A (k', d_in), lora_B (d_out, k')) with ΔW = lora_B @ lora_A."""
        projection = self.projection(name)
        if projection is not None:
            return projection.detach().float(), memory_map.float()
        U, sigma, Vh = torch.linalg.svd(memory_map.float(), full_matrices=False)
        return Vh, U * sigma


def memory_modules(config: GeneratorConfig, layers: dict[str, int], num_layers: int) -> list[str]:
    """Names of the `config.memory_module` linears in the last `config.memory_layers` layers."""
    if not config.memory_layers:
        return []
    if config.memory_layers > num_layers:
        raise GenAdapterError(f"memory_layers {config.memory_layers} exceeds the model's {num_layers} layers")
    first = num_layers - config.memory_layers
    return [
        name for name, layer in layers.items() if name.rsplit(".", 1)[-1] == config.memory_module and layer >= first
    ]
