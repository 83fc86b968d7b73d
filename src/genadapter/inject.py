"""Applying generated adapters to the LM through forward hooks (no patched library code).

Two modes: `activate` adds ΔW x on the fly with a possibly different adapter per batch row (and lets
gradients reach the generator during training); `merge` writes W + ΔW into a new weight tensor for
zero-overhead single-adapter use and `unmerge` puts the untouched original tensor back, so the original
weights come back bit-exactly.

Every adapted module's ΔW x is a sum of low-rank products ((x Lᵀ) M) R: the generator's (L = A1 (R1, d_in),
M = S~ (R1, R2) of each row, R = scale · Bᵀ (R2, d_out)) and, for modules holding the next-token memory, the
memory's (L = P (k, d_in), M = mapᵀ (k, d_out) of each row, no R). Only M differs between rows, and it is kept the
smallest factor: while generating, reading the weights dominates a step, and each extra row reads
R1 · R2 more numbers per module, not R1 · d_out. Shared factors are formed once per `activate`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import GenAdapterError
from .generator import AdapterGenerator
from .memory import memory_key

Term = tuple[Tensor | None, Tensor, Tensor | None]  # L (r, d_in) or None (identity); M (N or 1, r, r2); R or None


def _add_product(output: Tensor, z: Tensor, factor: Tensor) -> Tensor:
    """output + z @ factor, fused where the dtypes allow: z (N, T, r), factor (N or 1, r, d_out)."""
    if output.dtype != factor.dtype:  # e.g. a bf16 base with an fp32 generator
        return output + (z @ factor).to(output.dtype)
    if factor.shape[0] == 1:
        return torch.addmm(output.flatten(0, -2), z.flatten(0, -2), factor[0]).view_as(output)
    return torch.baddbmm(output, z, factor)


def add_low_rank(output: Tensor, x: Tensor, terms: list[Term]) -> Tensor:
    """output + ΔW x for x (N, T, d_in), output (N, T, d_out), ΔW given as `terms`."""
    for left, rows, right in terms:
        z = x.to(rows.dtype)
        z = z if left is None else z @ left.to(rows.dtype).T  # (N, T, r)
        if right is None:
            output = _add_product(output, z, rows)
        else:
            output = _add_product(output, z @ rows, right.unsqueeze(0))
    return output


def dense_delta(terms: list[Term]) -> Tensor:
    """ΔW (d_out, d_in) of one adapter's terms (M with a leading dimension of 1)."""
    delta = 0
    for left, rows, right in terms:
        product = rows[0] if right is None else rows[0] @ right  # (r, d_out)
        delta = delta + (product.T if left is None else product.T @ left)
    return delta


class AdapterInjector:
    def __init__(self, model: nn.Module, generator: AdapterGenerator):
        self.model = model
        self.generator = generator
        self._active: dict[str, list[Term]] | None = None
        self._originals: dict[str, Tensor] | None = None
        modules = dict(model.named_modules())
        self._modules = {name: modules[name] for name in generator.module_names}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self._modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self._active is None:
                return None
            return add_low_rank(output, args[0], self._active[name])

        return hook

    def low_rank_terms(self, factors: dict[str, Tensor]) -> dict[str, list[Term]]:
        """Per module the terms of ΔW for factors as `AdapterGenerator.adapters` gives them, with a leading row
        dimension: S~ (N, R1, R2) per module, memory maps (N, d_out, k)."""
        scale, memory = self.generator.config.scale, self.generator.memory
        terms = {}
        for name in self._modules:
            block = self.generator.block(name)
            terms[name] = [(block.A1, factors[name].to(block.B.dtype), scale * block.B.T)]
            memory_map = factors.get(memory_key(name, "map"))
            if memory_map is not None:
                terms[name].append((memory.projection(name), memory_map.mT, None))
        return terms

    @property
    def is_merged(self) -> bool:
        return self._originals is not None

    @contextmanager
    def activate(self, factors: dict[str, Tensor] | None) -> Iterator[None]:
        """Within the block, every forward adds ΔW x; rows of `factors` pair with batch rows."""
        if factors is not None and self.is_merged:
            raise GenAdapterError("an adapter is merged into the weights: unmerge() before using another state")
        previous, self._active = self._active, None if factors is None else self.low_rank_terms(factors)
        try:
            yield
        finally:
            self._active = previous

    @torch.no_grad()
    def merge(self, factors: dict[str, Tensor]) -> None:
        """W <- W + ΔW for one adapter (factors[name] is (R1, R2); memory maps, if any, are added too). The sum goes
        into a new tensor: the original one is kept as it was for unmerge."""
        if self.is_merged:
            raise GenAdapterError("an adapter is already merged: unmerge() first")
        terms = self.low_rank_terms({key: value.unsqueeze(0) for key, value in factors.items()})
        self._originals = {}
        for name, module in self._modules.items():
            delta = dense_delta(terms[name])
            self._originals[name] = module.weight.data
            module.weight.data = module.weight.data + delta.to(module.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._originals is None:
            raise GenAdapterError("no adapter is merged")
        for name, module in self._modules.items():
            module.weight.data = self._originals[name]
        self._originals = None

    def remove(self) -> None:
        if self.is_merged:
            self.unmerge()
        for handle in self._handles:
            handle.remove()
