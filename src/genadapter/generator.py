"""The adapter generator G (docs/design.md): frozen hidden states -> state S -> normalised S~ -> ΔW.

For an adapted linear y = W x in decoder layer l, with H the hidden states entering layer l:
    Ĥ = RMSNorm_γ(H);  K = Ĥ A2ᵀ (M×R1);  V = Ĥ A3ᵀ (M×R2);  S = Σ_t K_tᵀ V_(t+shift) (R1×R2), t within a chunk
    S~ = U_r V_rᵀ (SVD, singular values set to 1)  or  S / ||S||_F
         or (G + μI)⁻¹ S with G = Σ_t K_tᵀ K_t kept in the state too ("ridge": the least-squares write)
    ΔW = (α / R2) · B S~ᵀ A1   (d_out×d_in), B zero-initialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import KEY_PROJECTION_FIELDS, GeneratorConfig
from .errors import GenAdapterError, ModelLoadError
from .memory import BACKGROUND_PREFIX, NextTokenMemory, memory_modules
from .ridge import solve_relative_ridge

CONFIG_FILE = "generator_config.json"
WEIGHTS_FILE = "generator.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"  # a PEFT adapter directory, e.g. the authors' FastLoRA generators
_GRAM_TAG = ":gram"


def gram_key(name: str) -> str:
    """State key of G = Σ KᵀK (R1, R1), the key sum of one module that the "ridge" normalisation solves with."""
    return f"{name}{_GRAM_TAG}"


def is_gram_key(key: str) -> bool:
    return key.endswith(_GRAM_TAG)


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


def _without_autocast(device: torch.device) -> AbstractContextManager:
    # meta tensors (tests/test_device_normalise.py: nothing reaches the host) have no autocast
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else nullcontext()


def _svd_via_gram(S: Tensor, on_device: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD (U, σ descending, Vh) of a batch of small matrices from the fp64 eigendecomposition of the
    smaller Gram matrix: SᵀS = V Σ² Vᵀ, U = S V Σ⁻¹. Why: for the 240 96×96 states of a training step on CPU,
    `linalg.svd` took 0.21 s and this eigendecomposition 0.13 s (0.24 → 0.19 s for the normalisation's forward +
    backward; both loop over the batch serially). fp64 keeps the squared condition number harmless at fp32 input
    precision; columns of U for σ = 0 are returned as zero. `on_device` solves with torch.linalg.eigh where S lives
    instead of `batched_eigh`'s CPU threads."""
    if S.shape[-2] < S.shape[-1]:  # wide: factor Sᵀ and swap the roles of U and V
        U, sigma, Vh = _svd_via_gram(S.mT, on_device)
        return Vh.mT, sigma, U.mT
    S64 = S.double()
    eigenvalues, V = (torch.linalg.eigh if on_device else batched_eigh)(S64.mT @ S64)  # ascending
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
    def forward(ctx, S: Tensor, rank: int, on_device: bool = False) -> Tensor:  # S: (..., R1, R2)
        with _without_autocast(S.device):
            return _SVDNormalize._forward(ctx, S, rank, on_device)

    @staticmethod
    def _forward(ctx, S: Tensor, rank: int, on_device: bool) -> Tensor:
        U, sigma, Vh = _svd_via_gram(S, on_device)
        U, sigma, Vh = U[..., :rank], sigma[..., :rank], Vh[..., :rank, :]
        tol = sigma[..., :1].clamp_min(torch.finfo(S.dtype).tiny) * max(S.shape[-2:]) * torch.finfo(S.dtype).eps
        keep = (sigma > tol).to(S.dtype)  # (..., r): numerically zero directions stay zero
        U = U * keep.unsqueeze(-2)
        ctx.save_for_backward(U, sigma, Vh, keep)
        return U @ Vh

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        U, sigma, Vh, keep = ctx.saved_tensors
        with _without_autocast(grad.device):
            return _SVDNormalize._backward(grad.to(U.dtype), U, sigma, Vh, keep), None, None

    @staticmethod
    def _backward(grad: Tensor, U: Tensor, sigma: Tensor, Vh: Tensor, keep: Tensor) -> Tensor:
        g = U.transpose(-1, -2) @ grad @ Vh.transpose(-1, -2)  # (..., r, r)
        pair = keep.unsqueeze(-1) * keep.unsqueeze(-2)
        denom = (sigma.unsqueeze(-1) + sigma.unsqueeze(-2)).clamp_min(torch.finfo(sigma.dtype).tiny)
        inner = (g - g.transpose(-1, -2)) / denom * pair
        return U @ inner @ Vh


# The device path of the SVD normalisation: matrix products only (see _PolarNormalize).
POLAR_LOWER = 1.7  # lower end of the Newton–Schulz interval, in units of the cut; up to 1.8 the map's 1/2 stays
# below the cut for 1 to 4,096 rows, so polar_schedule's gain ≤ 1
POLAR_PURIFY_STEPS = 4
POLAR_BOUND_SQUARINGS = 4  # s overestimates σ₁ by at most n^(1/64): 7.4 % for n = 96
Schedule = tuple[float, tuple[tuple[float, float], ...]]


def polar_map(x: float, schedule: Schedule) -> float:
    """What the device path does to one singular value x of S / s (s ≥ σ₁): the scalar map F of _polar_steps."""
    gain, steps = schedule
    x *= gain
    for a, b in steps:
        x = a * x + b * x**3
    for _ in range(POLAR_PURIFY_STEPS):
        x = 2.5 * x**3 - 1.5 * x**5
    return x


@lru_cache(maxsize=32)
def polar_schedule(cut: float, stop: float = 0.99) -> Schedule:
    """(gain, steps) of the device path for singular values in [0, 1] whose cut-off is `cut`: the scaled
    Newton–Schulz steps X ← a X + b X XᵀX that take every singular value in [POLAR_LOWER · cut, 1] into [stop, 1],
    per step the optimal cubic for the current interval [l, 1] (α = √(3 / (1 + l + l²)), a = 3α/2, b = −α³/2, whose
    values at l and 1 meet at the new lower end: l grows about 2.6× a step); and the gain ≤ 1 by which S / s is
    scaled first so that the whole map (polar_map, purifying steps included) sends `cut` to exactly 1/2. Below the
    interval the steps are nearly linear, so where the cut lands depends on how far the last step overshoots
    `stop`: 0.65–0.95 · cut for the cut-offs of 1 to 4,096 rows; the gain moves it to `cut`."""
    steps, low = [], POLAR_LOWER * cut
    while low < stop:
        alpha = (3 / (1 + low + low * low)) ** 0.5
        a, b = 1.5 * alpha, -0.5 * alpha**3
        steps.append((a, b))
        low = a * low + b * low**3
    below, above = 0.0, POLAR_LOWER * cut  # polar_map rises on [0, POLAR_LOWER · cut]: bisect for its 1/2
    for _ in range(200):
        middle = (below + above) / 2
        below, above = (middle, above) if polar_map(middle, (1.0, tuple(steps))) < 0.5 else (below, middle)
    if below > cut:
        raise GenAdapterError(f"no device-path schedule for the cut-off {cut}")  # a gain > 1 could leave [0, 1]
    return below / cut, tuple(steps)


def spectral_upper_bound(gram: Tensor, squarings: int = POLAR_BOUND_SQUARINGS) -> Tensor:
    """An upper bound (...,) of the largest eigenvalue of the PSD matrices `gram` (..., n, n), at most a factor
    n^(1/2^(squarings + 1)) above it: ‖G^(2^k)‖_F^(1/2^k), by repeated squaring renormalised at each step."""
    tiny = torch.finfo(gram.dtype).tiny
    norm = torch.linalg.matrix_norm(gram)
    power, log_bound = gram / norm.clamp_min(tiny)[..., None, None], norm.clamp_min(tiny).log()
    for k in range(1, squarings + 1):
        power = power @ power
        norm = torch.linalg.matrix_norm(power).clamp_min(tiny)
        power, log_bound = power / norm[..., None, None], log_bound + norm.log() / 2**k
    return torch.where(gram.flatten(-2).abs().amax(-1) > 0, log_bound.exp(), 0)


def _polar_steps(
    X: Tensor, steps: tuple[tuple[float, float], ...], tangent: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The scaled Newton–Schulz steps (a, b), then POLAR_PURIFY_STEPS steps X ← X(5/2 A − 3/2 A²) (A = XᵀX:
    singular values x ↦ 5/2 x³ − 3/2 x⁵, which sends x > 0.816 to 1 and x < 0.816 to 0, both superlinearly), on
    X (B, m, n), m ≥ n; with `tangent`, also the derivative of the steps along that direction."""
    for a, b in steps:
        A = X.mT @ X
        if tangent is not None:
            dX = tangent.mT @ X
            dA = dX + dX.mT
            tangent = torch.baddbmm(torch.baddbmm(tangent, tangent, A, beta=a, alpha=b), X, dA, alpha=b)
        X = torch.baddbmm(X, X, A, beta=a, alpha=b)
    for _ in range(POLAR_PURIFY_STEPS):
        A = X.mT @ X
        M = torch.baddbmm(A, A, A, beta=2.5, alpha=-1.5)
        if tangent is not None:
            dX = tangent.mT @ X
            dA = dX + dX.mT
            AdA = A @ dA
            dM = 2.5 * dA - 1.5 * (AdA + AdA.mT)
            tangent = torch.baddbmm(tangent @ M, X, dM)
        X = X @ M
    return X, tangent


class _PolarNormalize(torch.autograd.Function):
    """S -> U Vᵀ on the numerically non-zero singular directions (rank = min(R1, R2)), from matrix products only:
    the device path of normalize_state.

    Why: the exact path eigendecomposes the Gram matrices on CPU threads, a host round trip per step on a GPU, and
    on the GPU itself cuSOLVER solves eigenproblems larger than 32 × 32 one matrix at a time (1.26 ms each for
    96 × 96 on an H200: 9.7 s for the 7,680 states of one batch-32 pretraining step). Here every step is one
    batched matmul over all states; nothing leaves the device and the iteration count is fixed (no data-dependent
    stopping, so no sync).

    Forward, in fp64 (a step sends singular values near 1 down to ~2.6 × its interval's lower end, 5 · 10⁻⁵ at first
    for 96 × 96 states, by cancellation: in fp32 the rounding of each product would swamp those directions):
    X = gain · S / s with s ≥ σ₁ (spectral_upper_bound of SᵀS), then the steps of polar_schedule for
    cut = max(R1, R2) · eps(fp32) — the exact path's cut-off for fp32 states, in units of s ≈ σ₁ — and the purifying
    steps of _polar_steps. Singular values above 1.6 · cut end within 10⁻⁹ of 1 and those below 0.6 · cut under
    10⁻⁷, so rank-deficient states (repeated zero singular values) keep their zero directions. The exact path decides
    the same directions except those within that band around its cut-off, or within the ≤ 7.4 % by which s
    overestimates σ₁: directions at the noise floor of an fp32 state, which its rounding decides in either path. (The
    cut uses eps(fp32) for fp64 states too.) 13 + 4 steps for 96 × 96 states: 43 batched matmuls forward, 102
    backward.

    Backward: the exact path's gradient U [(g − gᵀ) / (σᵢ + σⱼ)] Vᵀ, g = Uᵀ ∇ V on the kept directions. The map
    X ↦ U F(Σ) Vᵀ computed by the steps has a self-adjoint derivative, so the gradient is its derivative along the
    incoming gradient (carried through the same steps, recomputed from S: no iterates stored), projected onto the
    kept directions (Q Qᵀ · Qᵀ Q). With F = 1 and F′ = 0 on the kept singular values it equals the exact path's."""

    @staticmethod
    def forward(ctx, S: Tensor) -> Tensor:  # S: (B, R1, R2)
        with _without_autocast(S.device):
            X, scale, steps = _PolarNormalize._setup(S)
            Q, _ = _polar_steps(X, steps)
            ctx.save_for_backward(S, scale)
            return _PolarNormalize._unwide(Q, S).to(S.dtype)

    @staticmethod
    def _setup(S: Tensor) -> tuple[Tensor, Tensor, tuple[tuple[float, float], ...]]:
        """X = gain · S / s (tall), the scale s / gain (B,) and the Newton–Schulz steps."""
        gain, steps = polar_schedule(max(S.shape[-2:]) * torch.finfo(torch.float32).eps)
        X = _PolarNormalize._tall(S).double()
        scale = spectral_upper_bound(X.mT @ X).sqrt() / gain
        return X * _PolarNormalize._inverse(scale), scale, steps

    @staticmethod
    def _inverse(scale: Tensor) -> Tensor:  # (B, 1, 1); 0 for a zero state, whose output and gradient are zero
        return torch.where(scale > 0, 1 / scale, 0)[:, None, None]

    @staticmethod
    def _tall(S: Tensor) -> Tensor:
        return S.mT if S.shape[-2] < S.shape[-1] else S

    @staticmethod
    def _unwide(X: Tensor, S: Tensor) -> Tensor:
        return X.mT if S.shape[-2] < S.shape[-1] else X

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        S, scale = ctx.saved_tensors
        with _without_autocast(grad.device):
            X, _, steps = _PolarNormalize._setup(S)
            tangent = _PolarNormalize._tall(grad).double() * _PolarNormalize._inverse(scale)
            Q, tangent = _polar_steps(X, steps, tangent)
            tangent = Q @ ((Q.mT @ tangent) @ (Q.mT @ Q))  # onto the kept directions, on both sides
            return _PolarNormalize._unwide(tangent, S).to(S.dtype)


NORMALIZER_ENV = "GENADAPTER_NORMALIZER"
NORMALIZERS = ("auto", "exact", "device")


def normalizer_for(S: Tensor, method: str | None = None) -> str:
    """The path normalize_state takes for S, "exact" or "device": `method` if given, else $GENADAPTER_NORMALIZER,
    else "auto", which is "exact" for CPU tensors and "device" for tensors on any other device."""
    method = method or os.environ.get(NORMALIZER_ENV) or "auto"
    if method not in NORMALIZERS:
        raise GenAdapterError(f"normalizer must be one of {list(NORMALIZERS)}, got {method!r} (${NORMALIZER_ENV})")
    if method == "auto":
        return "exact" if S.device.type == "cpu" else "device"
    return method


def normalize_state(S: Tensor, config: GeneratorConfig, method: str | None = None) -> Tensor:
    """Normalised state S~ (..., R1, R2); computed in fp32 or fp64, never in half precision.

    The SVD normalisation has two paths that compute the same S~ (tests/test_device_normalise.py), chosen by
    normalizer_for: "exact" (CPU tensors): an fp64 eigendecomposition of the Gram matrices on CPU threads
    (_SVDNormalize); "device" (any other device): everything stays where S is — matrix products only when nothing
    is truncated (rank = min(R1, R2), _PolarNormalize), else the exact path's math with torch.linalg.eigh on the
    device (a truncated rank needs the ordering of the singular values)."""
    if S.dtype in (torch.float16, torch.bfloat16):
        S = S.float()
    if config.normalization == "svd":
        if normalizer_for(S, method) == "exact":
            return _SVDNormalize.apply(S, config.rank, False)
        if config.rank < min(S.shape[-2:]):
            return _SVDNormalize.apply(S, config.rank, True)
        return _PolarNormalize.apply(S.reshape(-1, *S.shape[-2:])).reshape(S.shape)
    norm = torch.linalg.matrix_norm(S).clamp_min(1e-12)
    return S / norm[..., None, None]


def ridge_normalize(S: Tensor, gram: Tensor, num_tokens: int | Tensor, strength: float) -> Tensor:
    """S~ = (G + μI)⁻¹ S (..., R1, R2), μ = strength · tr(G) / n_tokens, solved in fp64 (returned in fp32): the
    ridge-regression map from the context's keys to its values, so a query A1 x reads out Sᵀ (G + μI)⁻¹ A1 x, the
    value its keys predict. Zero where no token was absorbed. gram: (..., R1, R1); num_tokens: an int, or one count
    per index of the dimension just before the matrices' (one per context)."""
    with _without_autocast(S.device):
        return solve_relative_ridge(gram, S, num_tokens, strength).float()


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
                    if self.config.normalization == "ridge":
                        out[gram_key(name)] = keys.transpose(-1, -2) @ keys  # (N, R1, R1)
        return {key: out[key] for key in self.state_keys}

    @property
    def state_keys(self) -> list[str]:
        """Keys of the generator's own part of a state, in order: S per module, then with the "ridge" normalisation
        G per module (the next-token memory's parts are its own: memory.empty_sums)."""
        grams = [gram_key(name) for name in self.targets] if self.config.normalization == "ridge" else []
        return [*self.targets, *grams]

    def empty_sums(self) -> dict[str, Tensor]:
        """Zero sums of the generator's own part of a state: S (R1, R2) and G (R1, R1)."""
        r1, r2 = self.config.key_dim, self.config.value_dim
        return {key: torch.zeros(r1, r1 if is_gram_key(key) else r2) for key in self.state_keys}

    def normalize(self, sums: dict[str, Tensor], num_tokens: int | Tensor | None = None) -> dict[str, Tensor]:
        """Normalised states of all modules, in one batched SVD or ridge solve (every module's state is R1 × R2);
        memory parts of a state's sums, if any, are left out (see `adapters`). The "ridge" normalisation needs the
        G sums and the token count (`adapters` passes them)."""
        names = [name for name in self.targets if name in sums]
        if not names:
            return {}
        stacked = torch.stack([sums[name] for name in names])
        if self.config.normalization == "ridge":
            if num_tokens is None or any(gram_key(name) not in sums for name in names):
                raise GenAdapterError("the ridge normalisation solves with the state's G sums and its token count")
            grams = torch.stack([sums[gram_key(name)] for name in names])
            normalized = ridge_normalize(stacked, grams, num_tokens, self.config.ridge)
        else:
            normalized = normalize_state(stacked, self.config)
        return dict(zip(names, normalized.unbind(0), strict=True))

    def adapters(self, sums: dict[str, Tensor], num_tokens: int | Tensor) -> dict[str, Tensor]:
        """What the injector applies: S~ per module, plus the solved next-token memory maps when it is on."""
        adapters = self.normalize(sums, num_tokens)
        if self.memory is not None:
            adapters.update(self.memory.maps(sums, num_tokens))
        return adapters

    def export_rank(self) -> int:
        """Rank of the exported LoRA: exact for every normalisation."""
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
        e.g. {"memory_layers": 15} to add the next-token memory to a generator trained without it. A PEFT-style
        directory of the authors' FastLoRA generators (adapter_config.json) is read by fastlora.py."""
        directory = Path(directory)
        if (directory / PEFT_CONFIG_FILE).is_file() and not (directory / CONFIG_FILE).is_file():
            from .fastlora import load_fastlora  # fastlora.py builds on this module

            return load_fastlora(directory, model, overrides)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{directory} is not a generator directory ({CONFIG_FILE} + {WEIGHTS_FILE})")
        saved = GeneratorConfig.load(directory / CONFIG_FILE)
        generator = cls.for_model(model, saved.with_overrides(overrides))
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except Exception as exc:  # safetensors raises several types on corrupt files
            raise ModelLoadError(f"cannot read generator weights {directory / WEIGHTS_FILE}: {exc}") from exc
        own = generator.state_dict()
        # Σ of the memory's background term may be missing (measured later: calibrate_memory) or unused (β = 0), and
        # learned memory keys are unused when an override switches the memory off
        unused = "memory." if generator.memory is None else f"memory.{BACKGROUND_PREFIX}"
        optional = {k for k in {*own, *tensors} if k.startswith(unused)}
        if any(getattr(generator.config, k) != getattr(saved, k) for k in KEY_PROJECTION_FIELDS):
            # Σ was measured for the saved key projections: other modules or widths draw others, which need their own
            tensors = {k: v for k, v in tensors.items() if not k.startswith(f"memory.{BACKGROUND_PREFIX}")}
        if set(tensors) - optional != set(own) - optional or any(
            tensors[k].shape != own[k].shape for k in own if k in tensors
        ):
            raise ModelLoadError(f"generator in {directory} does not fit this base model's modules")
        generator.load_state_dict({k: v.float() for k, v in tensors.items() if k in own}, strict=False)
        return generator
