"""ContextState: what a context leaves behind — per-module sums S = Σ Kᵀ V and a token count.

States are sums over tokens, so they add (union of contexts) and subtract (exact removal of a context
absorbed before, up to fp32 rounding). The state, not the normalised adapter, is what is stored. States of a
generator with chunk_mode "sequential" neither add nor subtract: each chunk's sum depends on the chunks before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from .errors import GenAdapterError, IncompatibleStateError, StateFileError
from .fileio import write_atomic

FORMAT = "genadapter-state/3"  # float32 sums; symmetric ones (the memory's key Gram G) as their upper triangle
HALF_FORMAT = "genadapter-state/4"  # as /3 in float16, each tensor divided by its largest magnitude (in metadata)
READABLE_FORMATS = {  # format -> stored in float16; /1 and /2 (before packing) hold every sum in full
    "genadapter-state/1": False,
    "genadapter-state/2": True,
    FORMAT: False,
    HALF_FORMAT: True,
}


def is_symmetric(tensor: Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.shape[-1] == tensor.shape[-2] and torch.equal(tensor, tensor.mT)


def pack_symmetric(tensor: Tensor) -> Tensor:
    """(..., n, n) symmetric -> (..., n (n + 1) / 2), its upper triangle row by row."""
    rows, cols = torch.triu_indices(tensor.shape[-1], tensor.shape[-1])
    return tensor[..., rows, cols].contiguous()


def unpack_symmetric(packed: Tensor) -> Tensor:
    """Inverse of pack_symmetric."""
    n = int(((8 * packed.shape[-1] + 1) ** 0.5 - 1) / 2)
    if n * (n + 1) // 2 != packed.shape[-1]:
        raise ValueError(f"{packed.shape[-1]} entries are no packed upper triangle")
    rows, cols = torch.triu_indices(n, n)
    full = packed.new_zeros(*packed.shape[:-1], n, n)
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


@dataclass
class ContextState:
    """Per-module state sums plus the provenance needed to refuse mixing generators."""

    sums: dict[str, Tensor]  # module name -> (R1, R2) float32
    num_tokens: int
    base_model: str
    generator_fingerprint: str
    generator_config: dict = field(default_factory=dict)
    # what GenerativeAdapter.adapter_factors last derived from these sums, with what it was derived from
    cached_factors: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def _check_compatible(self, other: ContextState) -> None:
        if not isinstance(other, ContextState):
            raise TypeError(f"cannot combine a ContextState with {type(other).__name__}")
        if other.generator_fingerprint != self.generator_fingerprint or other.base_model != self.base_model:
            raise IncompatibleStateError(
                f"states come from different generators: {self.generator_fingerprint} on {self.base_model} "
                f"vs {other.generator_fingerprint} on {other.base_model}"
            )

    @property
    def chunk_mode(self) -> str:
        """How the generator encoded the chunks (GeneratorConfig.chunk_mode); states saved before it existed are
        independent."""
        return self.generator_config.get("chunk_mode", "independent")

    def _combine(self, other: ContextState, sign: int) -> ContextState:
        self._check_compatible(other)
        if self.chunk_mode != "independent":
            raise GenAdapterError(
                f"states of a generator with chunk_mode {self.chunk_mode!r} cannot be added or subtracted: each chunk "
                "was encoded with the adapter of the chunks before it, so the sum of two states is not the state of "
                "the two contexts. Addition is exact only in chunk_mode 'independent'; absorb the whole context instead"
            )
        num_tokens = self.num_tokens + sign * other.num_tokens
        if num_tokens < 0:
            raise IncompatibleStateError("cannot subtract a state with more tokens than this one holds")
        sums = {k: v + sign * other.sums[k] for k, v in self.sums.items()}
        if num_tokens == 0:  # fp32 residue of a full removal would normalise to a random full-strength adapter
            sums = {k: torch.zeros_like(v) for k, v in sums.items()}
        return ContextState(
            sums=sums,
            num_tokens=num_tokens,
            base_model=self.base_model,
            generator_fingerprint=self.generator_fingerprint,
            generator_config=dict(self.generator_config),
        )

    def __add__(self, other: ContextState) -> ContextState:
        return self._combine(other, +1)

    def __sub__(self, other: ContextState) -> ContextState:
        return self._combine(other, -1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def allclose(self, other: ContextState, rtol: float = 1e-5, atol: float = 1e-5) -> bool:
        return (
            self.num_tokens == other.num_tokens
            and self.sums.keys() == other.sums.keys()
            and all(torch.allclose(v, other.sums[k], rtol=rtol, atol=atol) for k, v in self.sums.items())
        )

    def metadata(self, fmt: str = FORMAT) -> dict[str, str]:
        return {
            "format": fmt,
            "num_tokens": str(self.num_tokens),
            "base_model": self.base_model,
            "generator_fingerprint": self.generator_fingerprint,
            "generator_config": json.dumps(self.generator_config, sort_keys=True),
        }

    def to_bytes(self, half: bool = False) -> bytes:
        """safetensors bytes. A sum that is exactly symmetric (the memory's key Gram G = Σ k kᵀ) is stored as its
        upper triangle: nothing lost, about half its bytes. `half` stores each sum as float16 after dividing it by its
        largest magnitude: half the bytes, and no entry out of float16's range however many tokens were summed; an
        entry x comes back within 2⁻¹¹·|x| + 2⁻²⁵·max|x| of itself (float32 keeps 2⁻²⁴·|x|). Loading gives the full
        float32 sums again."""
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.sums.items()}
        symmetric = sorted(k for k, v in tensors.items() if is_symmetric(v))
        tensors |= {k: pack_symmetric(tensors[k]) for k in symmetric}
        packing = {"symmetric": json.dumps(symmetric)}
        if not half:
            return save(tensors, metadata=self.metadata() | packing)
        scales = {k: float(v.abs().max()) or 1.0 for k, v in tensors.items()}
        halves = {k: (v / scales[k]).half() for k, v in tensors.items()}
        return save(
            halves, metadata=self.metadata(HALF_FORMAT) | packing | {"scales": json.dumps(scales, sort_keys=True)}
        )

    def save(self, path: str | Path) -> None:
        """Write safetensors atomically: the file is complete or not there at all."""
        data = self.to_bytes()
        write_atomic(path, lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: str | Path) -> ContextState:
        path = Path(path)
        if not path.is_file():
            raise StateFileError(f"state file {path} does not exist")
        return cls.from_bytes(path.read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ContextState:
        try:
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        except (SafetensorError, ValueError, UnicodeDecodeError) as exc:
            raise StateFileError(f"{source} is not a valid genadapter state (corrupted or truncated)") from exc
        fmt = metadata.get("format")
        if fmt not in READABLE_FORMATS:
            raise StateFileError(f"{source} is not a genadapter state file (or one from a newer genadapter)")
        try:
            if READABLE_FORMATS[fmt]:
                scales = json.loads(metadata["scales"])
                tensors = {k: v.float() * scales[k] for k, v in tensors.items()}
            tensors |= {k: unpack_symmetric(tensors[k]) for k in json.loads(metadata.get("symmetric", "[]"))}
            return cls(
                sums=tensors,
                num_tokens=int(metadata["num_tokens"]),
                base_model=metadata["base_model"],
                generator_fingerprint=metadata["generator_fingerprint"],
                generator_config=json.loads(metadata["generator_config"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateFileError(f"{source} has incomplete genadapter metadata") from exc
