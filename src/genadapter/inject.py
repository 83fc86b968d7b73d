"""Applying generated adapters to the LM through forward hooks (no patched library code).

Two modes: `activate` adds ΔW x on the fly with a possibly different adapter per batch row (and lets
gradients reach the generator during training); `merge` writes ΔW into the weights for zero-overhead
single-adapter use and `unmerge` restores a saved copy, so the original weights come back bit-exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import GenAdapterError
from .generator import AdapterGenerator
from .memory import memory_key


class AdapterInjector:
    def __init__(self, model: nn.Module, generator: AdapterGenerator):
        self.model = model
        self.generator = generator
        self._active: dict[str, Tensor] | None = None  # module name -> (N or 1, R1, R2); memory maps (N or 1, d_out, k)
        self._originals: dict[str, Tensor] | None = None
        modules = dict(model.named_modules())
        self._modules = {name: modules[name] for name in generator.module_names}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self._modules.items()]

    def _hook(self, name: str):
        block = self.generator.block(name)

        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self._active is None:
                return None
            delta = block.delta(args[0], self._active[name], self.generator.config.scale)
            memory_map = self._active.get(memory_key(name, "map"))
            if memory_map is not None:
                delta = delta + self.generator.memory.delta(name, args[0], memory_map)
            return output + delta.to(output.dtype)

        return hook

    @property
    def is_merged(self) -> bool:
        return self._originals is not None

    @contextmanager
    def activate(self, factors: dict[str, Tensor] | None) -> Iterator[None]:
        """Within the block, every forward adds ΔW x; rows of `factors` pair with batch rows."""
        if factors is not None and self.is_merged:
            raise GenAdapterError("an adapter is merged into the weights: unmerge() before using another state")
        previous, self._active = self._active, factors
        try:
            yield
        finally:
            self._active = previous

    @torch.no_grad()
    def merge(self, factors: dict[str, Tensor]) -> None:
        """W <- W + ΔW for one adapter (factors[name] is (R1, R2); memory maps, if any, are added too)."""
        if self.is_merged:
            raise GenAdapterError("an adapter is already merged: unmerge() first")
        self._originals = {name: mod.weight.detach().clone() for name, mod in self._modules.items()}
        scale = self.generator.config.scale
        for name, module in self._modules.items():
            delta = self.generator.block(name).delta_weight(factors[name], scale)
            memory_map = factors.get(memory_key(name, "map"))
            if memory_map is not None:
                delta = delta + self.generator.memory.delta_weight(name, memory_map)
            module.weight.add_(delta.to(module.weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._originals is None:
            raise GenAdapterError("no adapter is merged")
        for name, module in self._modules.items():
            module.weight.copy_(self._originals[name])
        self._originals = None

    def remove(self) -> None:
        if self.is_merged:
            self.unmerge()
        for handle in self._handles:
            handle.remove()
