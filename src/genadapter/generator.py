"""The adapter generator G (docs/design.md): frozen hidden states -> state S -> normalised S~ -> ΔW.

For an adapted linear y = W x in decoder layer l, with H the hidden states entering layer l:
    Ĥ = RMSNorm_γ(H);  K = Ĥ A2ᵀ (M×R1);  V = Ĥ A3ᵀ (M×R2);  S = Σ_t K_tᵀ V_(t+shift) (R1×R2), t within a chunk
    S~ = U_r V_rᵀ (SVD, singular values set to 1)  or  S / ||S||_F
    ΔW = (α / R2) · B S~ᵀ A1   (d_out×d_in), B zero-initialised.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import GeneratorConfig
from .errors import GenAdapterError, ModelLoadError
from .memory import BACKGROUND_PREFIX, NextTokenMemory, memory_modules

CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"


@lru_cache(maxsize=4)
def _eigh_pool(workers: int) -> ThreadPoolExecutor:
    # one intra-op thread per worker: nested OpenMP teams left spinning slowed later serial work 5x (2-core VM)
    return ThreadPoolExecutor(
        workers, thread_name_prefix="genadapter-eigh", initializer=torch.set_num_threads, initargs=(1,)
    )


def batched_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh of a batch of small symmetric matrices, solved on the CPU with the batch split across
    threads (results on gram's device). Why: ATen's CPU eigh solves a batch one matrix at a time, and so does
    cuSOLVER beyond 32×32; on an H200 a training step with 7,680 96×96 states (32 sequences) took 12 s, almost all
    of it in those serial solves. Each matrix is solved alone on one thread, so the split does not change the result
    (a multi-threaded LAPACK call may differ from it in the last bits)."""
    flat = gram.reshape(-1, *gram.shape[-2:]).cpu()
    workers = max(1, min(torch.get_num_threads(), len(flat)))
    parts = list(_eigh_pool(workers).map(torch.linalg.eigh, flat.chunk(workers)))
    values = torch.cat([vals for vals, _ in parts]).to(gram.device)
    vectors = torch.cat([vecs for _, vecs in parts]).to(gram.device)
    return values.view(gram.shape[:-1]), vectors.view(gram.shape)


def _svd_via_gram(S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD (U, σ descending, Vh) of a batch of small matrices from the fp64 eigendecomposition of the
    smaller Gram matrix: SᵀS = V Σ² Vᵀ, U = S V Σ⁻¹. Why: for the 240 96×96 states of a training step on CPU,
    `linalg.svd` took 0.21 s and this eigendecomposition 0.13 s (0.24 → 0.19 s for the normalisation's forward +
    backward; both loop over the batch serially). fp64 keeps the squared condition number harmless at fp32 input
    precision; columns of U for σ = 0 are returned as zero."""
    if S.shape[-2] < S.shape[-1]:  # wide: factor Sᵀ and swap the roles of U and V
        U, sigma, Vh = _svd_via_gram(S.mT)
        return Vh.mT, sigma, U.mT
    S64 = S.double()
    eigenvalues, V = batched_eigh(S64.mT @ S64)  # ascending
    sigma, V = eigenvalues.flip(-1).clamp_min(0).sqrt(), V.flip(-1)
    U = (S64 @ V) / torch.where(sigma > 0, sigma, 1).unsqueeze(-2)
    return U.to(S.dtype), sigma.to(S.dtype), V.mT.to(S.dtype)


class _SVDNormalize(torch.autograd.Function):
    """S -> U_r V_rᵀ with a backward that stays finite when singular values coincide.

    The exact SVD gradient has 1/(σᵢ² − σⱼ²) terms and turns to NaN on the rank-deficient states of
    short chunks. The polar factor U Vᵀ has a gradient with only 1/(σᵢ + σⱼ) terms, finite for any
    repeated non-zero singular values; we use it on the kept subspace and treat the choice of that
    subspace as fixed. This is the exact gradient whenever nothing is truncated (rank == min(R1, R2)
    and S has full rank), and a bounded approximation otherwise. Forward is exact, so training and
    inference compute the same adapter.
    """

    @staticmethod
    def forward(ctx, S: Tensor, rank: int) -> Tensor:  # S: (..., R1, R2)
        with torch.autocast(S.device.type, enabled=False):
            return _SVDNormalize._forward(ctx, S, rank)

    @staticmethod
    def _forward(ctx, S: Tensor, rank: int) -> Tensor:
        U, sigma, Vh = _svd_via_gram(S)
        U, sigma, Vh = U[..., :rank], sigma[..., :rank], Vh[..., :rank, :]
        tol = sigma[..., :1].clamp_min(torch.finfo(S.dtype).tiny) * max(S.shape[-2:]) * torch.finfo(S.dtype).eps
        keep = (sigma > tol).to(S.dtype)  # (..., r): numerically zero directions stay zero
        U = U * keep.unsqueeze(-2)
        ctx.save_for_backward(U, sigma, Vh, keep)
        return U @ Vh

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        U, sigma, Vh, keep = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return _SVDNormalize._backward(grad.to(U.dtype), U, sigma, Vh, keep), None

    @staticmethod
    def _backward(grad: Tensor, U: Tensor, sigma: Tensor, Vh: Tensor, keep: Tensor) -> Tensor:
        g = U.transpose(-1, -2) @ grad @ Vh.transpose(-1, -2)  # (..., r, r)
        pair = keep.unsqueeze(-1) * keep.unsqueeze(-2)
        denom = (sigma.unsqueeze(-1) + sigma.unsqueeze(-2)).clamp_min(torch.finfo(sigma.dtype).tiny)
        inner = (g - g.transpose(-1, -2)) / denom * pair
        return U @ inner @ Vh


def normalize_state(S: Tensor, config: GeneratorConfig) -> Tensor:
    """Normalised state S~ (..., R1, R2); computed in fp32 or fp64, never in half precision."""
    if S.dtype in (torch.float16, torch.bfloat16):
        S = S.float()
    if config.normalization == "svd":
        return _SVDNormalize.apply(S, config.rank)
    norm = torch.linalg.matrix_norm(S).clamp_min(1e-12)
    return S / norm[..., None, None]


@dataclass(frozen=True)
class TargetSpec:
    """Where an adapted linear sits in the LM and its shape."""

    layer: int
    in_features: int
    out_features: int


class ModuleGenerator(nn.Module):
    """Generator parameters γ, A1, A2, A3, B of one adapted linear module."""

    def __init__(self, hidden_size: int, spec: TargetSpec, config: GeneratorConfig, rng: torch.Generator):
        super().__init__()
        r1, r2 = config.key_dim, config.value_dim
        self.gamma = nn.Parameter(torch.ones(hidden_size))
        self.A1 = nn.Parameter(torch.randn(r1, spec.in_features, generator=rng) / spec.in_features**0.5)
        self.A2 = nn.Parameter(torch.randn(r1, hidden_size, generator=rng) / hidden_size**0.5)
        self.A3 = nn.Parameter(torch.randn(r2, hidden_size, generator=rng) / hidden_size**0.5)
        self.B = nn.Parameter(torch.zeros(spec.out_features, r2))

    def key_value_weight(self) -> Tensor:
        """[A2 diag γ; A3 diag γ] (R1+R2, d): keys and values of RMS-normalised (γ-free) hidden states in one
        product. Folding γ into the weights means no gradient has to flow back into the hidden states."""
        return torch.cat([self.A2, self.A3]) * self.gamma

    def delta(self, x: Tensor, normalized: Tensor, scale: float) -> Tensor:
        """ΔW x for each row: x (N, T, d_in), normalized (N or 1, R1, R2) -> (N, T, d_out)."""
        z = (x.to(self.A1.dtype) @ self.A1.T) @ (scale * normalized.to(self.A1.dtype))  # scale the small factor
        return z @ self.B.T

    def delta_weight(self, normalized: Tensor, scale: float) -> Tensor:
        """Dense ΔW = scale · B S~ᵀ A1 (d_out, d_in) for merging into the base weight."""
        return scale * (self.B @ normalized.to(self.B.dtype).T @ self.A1)

    def lora_factors(self, normalized: Tensor, rank: int, scale: float) -> tuple[Tensor, Tensor]:
        """Exact rank-`rank` factors with ΔW = scale · lora_B @ lora_A (PEFT layout)."""
        U, sigma, Vh = torch.linalg.svd(normalized.float(), full_matrices=False)
        U, sigma, Vh = U[:, :rank], sigma[:rank], Vh[:rank]
        lora_a = U.T @ self.A1.float()  # (r, d_in)
        lora_b = self.B.float() @ (Vh.T * sigma)  # (d_out, r)
        return lora_a, lora_b


def _layer_index(name: str) -> int:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    if match is None:
        raise GenAdapterError(f"cannot tell which decoder layer module {name!r} belongs to")
    return int(match.group(1))


def find_targets(model: nn.Module, config: GeneratorConfig) -> dict[str, TargetSpec]:
    """Map adapted module names (e.g. 'model.layers.3.self_attn.o_proj') to their layer and shape."""
    targets, suffixes = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            suffix = name.rsplit(".", 1)[-1]
            suffixes.add(suffix)
            if suffix in config.target_modules:
                targets[name] = TargetSpec(_layer_index(name), module.in_features, module.out_features)
    missing = set(config.target_modules) - {n.rsplit(".", 1)[-1] for n in targets}
    if missing:
        raise GenAdapterError(
            f"target modules {sorted(missing)} not found in the model; its linear modules are {sorted(suffixes)}"
        )
    return targets


def _key(name: str) -> str:
    return name.replace(".", "/")  # nn.ModuleDict keys may not contain '.'


class AdapterGenerator(nn.Module):
    """All per-module generators of one LM, plus the config that shaped them."""

    def __init__(self, config: GeneratorConfig, targets: dict[str, TargetSpec], hidden_size: int):
        super().__init__()
        self.config = config
        self.targets = dict(targets)
        self.hidden_size = hidden_size
        self.modules_by_layer: dict[int, list[str]] = {}
        for name, spec in self.targets.items():
            self.modules_by_layer.setdefault(spec.layer, []).append(name)
        rng = torch.Generator().manual_seed(config.seed)
        self.blocks = nn.ModuleDict(
            {_key(name): ModuleGenerator(hidden_size, spec, config, rng) for name, spec in self.targets.items()}
        )
        layers = {name: spec.layer for name, spec in self.targets.items()}
        held = memory_modules(config, layers, max(layers.values()) + 1)
        self.memory = (
            NextTokenMemory(
                config,
                {name: self.targets[name].in_features for name in held},
                {name: self.targets[name].out_features for name in held},
            )
            if held
            else None
        )

    @classmethod
    def for_model(cls, model: nn.Module, config: GeneratorConfig) -> AdapterGenerator:
        hidden_size = model.config.get_text_config().hidden_size
        return cls(config, find_targets(model, config), hidden_size)

    def block(self, name: str) -> ModuleGenerator:
        return self.blocks[_key(name)]

    @property
    def module_names(self) -> list[str]:
        return list(self.targets)

    def chunk_states(self, hidden_states: Sequence[Tensor], mask: Tensor) -> dict[str, Tensor]:
        """Per-chunk states S = Σ_t K_tᵀ V_(t+s) of every module (s = value_shift): hidden_states[l] (N, T, d)
        enters layer l. Padding rows are zero, so pairs that reach into the padding add nothing.

        Modules of one layer share one RMS normalisation of its hidden states and one projection onto all
        their keys and values: fewer, larger matmuls, and γ folded into the weights (see key_value_weight)."""
        r1, r2, shift = self.config.key_dim, self.config.value_dim, self.config.value_shift
        out = {}
        with torch.autocast(mask.device.type, enabled=False):  # states are sums: keep them fp32
            for layer, names in self.modules_by_layer.items():
                h = hidden_states[layer].float()
                h = h * (torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.config.norm_eps) * mask.unsqueeze(-1))
                weight = torch.cat([self.block(name).key_value_weight() for name in names])
                projected = (h @ weight.T).split(r1 + r2, dim=-1)  # per module (N, T, R1 + R2)
                for name, kv in zip(names, projected, strict=True):
                    keys, values = kv[..., : max(kv.shape[-2] - shift, 0), :r1], kv[..., shift:, r1:]
                    out[name] = keys.transpose(-1, -2) @ values  # (N, R1, R2)
        return {name: out[name] for name in self.targets}

    def normalize(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Normalised states of all modules, in one batched SVD (every module's state is R1 × R2); memory parts
        of a state's sums, if any, are left out (see `adapters`)."""
        sums = {name: sums[name] for name in self.targets if name in sums}
        if not sums:
            return {}
        stacked = normalize_state(torch.stack(list(sums.values())), self.config)
        return dict(zip(sums, stacked.unbind(0), strict=True))

    def adapters(self, sums: dict[str, Tensor], num_tokens: int) -> dict[str, Tensor]:
        """What the injector applies: S~ per module, plus the solved next-token memory maps when it is on."""
        adapters = self.normalize(sums)
        if self.memory is not None:
            adapters.update(self.memory.maps(sums, num_tokens))
        return adapters

    def export_rank(self) -> int:
        """Rank of the exported LoRA: exact for both normalisations."""
        if self.config.normalization == "svd":
            return self.config.rank
        return min(self.config.key_dim, self.config.value_dim)

    def fingerprint(self) -> str:
        """Content hash of config + weights: states made by one generator only combine with its own."""
        digest = hashlib.sha256(json.dumps(self.config.identity(), sort_keys=True).encode())
        for key, tensor in sorted(self.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, directory: str | Path, dtype: torch.dtype = torch.float32) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "genadapter-generator"})
        self.config.save(directory / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, overrides: dict | None = None) -> AdapterGenerator:
        """A saved generator for `model`; `overrides` changes config fields no weight depends on (OVERRIDABLE),
        e.g. {"memory_layers": 15} to add the next-token memory to a generator trained without it."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{directory} is not a generator directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
        generator = cls.for_model(model, GeneratorConfig.load(directory / CONFIG_FILE).with_overrides(overrides))
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:  # safetensors raises several types on corrupt files
            raise ModelLoadError(f"cannot read generator weights {directory / WEIGHTS_FILE}: {exc}") from exc
        own = generator.state_dict()
        # Σ of the memory's background term may be missing (measured later: calibrate_memory) or unused (β = 0)
        optional = {k for k in {*own, *tensors} if k.startswith(f"memory.{BACKGROUND_PREFIX}")}
        if set(tensors) - optional != set(own) - optional or any(
            tensors[k].shape != own[k].shape for k in own if k in tensors
        ):
            raise ModelLoadError(f"generator in {directory} does not fit this base model's modules")
        generator.load_state_dict({k: v.float() for k, v in tensors.items() if k in own}, strict=False)
        return generator
