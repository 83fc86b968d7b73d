"""Typed configuration of an adapter generator, saved as JSON next to every generator."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import GenAdapterError

NORMALIZATIONS = ("svd", "frobenius", "ridge")
MEMORY_TARGETS = ("next", "error")
CHUNK_MODES = ("independent", "sequential")
CHUNK_SPLITS = ("fixed", "even")
MEMORY_FIELDS = (
    "memory_layers",
    "memory_module",
    "memory_keys",
    "memory_values",
    "memory_scale",
    "memory_ridge",
    "memory_targets",
    "memory_background",
)
# fields no parameter's shape depends on: a trained generator can be loaded (and trained on) with them changed
ENCODING_FIELDS = ("chunk_mode", "chunk_split", "context_bos")
OVERRIDABLE = ("rank", "value_shift", "ridge", *ENCODING_FIELDS, *MEMORY_FIELDS)
# fields the memory's key projections (their shapes, names and random draws) depend on, and so Σ measured for them
KEY_PROJECTION_FIELDS = ("memory_layers", "memory_module", "memory_keys")
# fields added after the first generators shipped: left out of fingerprints while they hold their default, so older
# generators keep their fingerprints and the states made with them stay valid
_LATER_FIELDS = ("value_shift", "ridge", "memory_learned_keys", *ENCODING_FIELDS, *MEMORY_FIELDS)


def check_overrides(overrides: dict) -> None:
    """Only OVERRIDABLE fields, each with a value of its field's type (an int may stand for a float)."""
    if set(overrides) - set(OVERRIDABLE):
        raise GenAdapterError(f"overrides may change only {list(OVERRIDABLE)}, got {sorted(overrides)}")
    for key, value in overrides.items():
        kind = type(getattr(GeneratorConfig, key))  # the field's default
        if not (type(value) is kind or (kind is float and type(value) is int)):
            raise GenAdapterError(f"override {key}={value!r} must be of type {kind.__name__}")


@dataclass
class GeneratorConfig:
    """Shape and behaviour of the adapter generator G (docs/design.md, "The method")."""

    target_modules: list[str] = field(
        default_factory=lambda: ["o_proj", "down_proj"],
        metadata={"help": "Suffixes of the nn.Linear modules to adapt, e.g. 'o_proj', 'down_proj'."},
    )
    key_dim: int = field(default=128, metadata={"help": "R1: width of the keys K = norm(H) A2^T (rows of S)."})
    value_dim: int = field(default=128, metadata={"help": "R2: width of the values V = norm(H) A3^T (cols of S)."})
    rank: int = field(default=128, metadata={"help": "r: rank kept by the SVD normalisation (<= min(R1, R2))."})
    alpha: float = field(default=64.0, metadata={"help": "Adapter scale; the update is (alpha / R2) B S~^T A1."})
    chunk_size: int = field(default=256, metadata={"help": "w: tokens per independently encoded context chunk."})
    normalization: str = field(
        default="svd",
        metadata={
            "help": "'svd': S~ = U_r V_r^T (paper); 'frobenius': S / ||S||_F (ablation); 'ridge': S~ = (G + mu I)^-1 S "
            "with G = sum K^T K also kept in the state, the least-squares (delta-rule) write: the adapter maps a "
            "query to the value the context's keys regress onto, not to a sum over every key it resembles."
        },
    )
    ridge: float = field(
        default=0.1,
        metadata={
            "help": "lambda of the 'ridge' normalisation: mu = lambda * tr(G) / n_tokens, i.e. lambda tokens' worth of "
            "mean key energy; larger blurs the write toward the plain sum, smaller fits every key exactly."
        },
    )
    chunk_mode: str = field(
        default="independent",
        metadata={
            "help": "How the chunks of a context are encoded: 'independent', each by the frozen LM alone, so states "
            "add and subtract exactly (genadapter's default); 'sequential', chunk i by the LM adapted with the state "
            "of chunks < i, which is then added to that state (the authors' FastLoRA encoding): states of this mode "
            "do not add or subtract, and a context is absorbed one chunk at a time."
        },
    )
    chunk_split: str = field(
        default="fixed",
        metadata={
            "help": "How a document is cut into chunks: 'fixed', chunks of chunk_size tokens and a shorter last one; "
            "'even', ceil(n / chunk_size) chunks of ceil(n / that) tokens (the authors' windows)."
        },
    )
    context_bos: bool = field(
        default=False,
        metadata={"help": "Start every context document with the tokenizer's BOS token (as the authors' code does)."},
    )
    value_shift: int = field(
        default=0,
        metadata={
            "help": "Pair each key with the value of the token this many positions later in its chunk: 0 (the paper) "
            "pairs a token with itself, 1 pairs 'the context up to here' with 'the token that came next', the "
            "association an induction head copies with. Chunks stay independent, so states still add up."
        },
    )
    memory_layers: int = field(
        default=0,
        metadata={
            "help": "Next-token memory (memory.py; not in the paper, no weights of its own): write the context's "
            "next-token associations in closed form into `memory_module` of the last this many layers; 0 turns it off."
        },
    )
    memory_module: str = field(
        default="down_proj", metadata={"help": "Suffix of the module that holds the memory; one of target_modules."}
    )
    memory_keys: int = field(
        default=256,
        metadata={"help": "Width k of the memory keys P x (P random, or learned); 0 keys on the full module input."},
    )
    memory_values: int = field(
        default=0,
        metadata={
            "help": "Width m of the stored next-token targets: each memory module keeps R e (R: m random orthonormal "
            "rows of length d_out, scaled so that E[R^T R] = I) instead of e, and expands the solved map by R^T, so "
            "C shrinks from d_out x k to m x k at the cost of cross-talk between tokens; 0 stores the full targets. "
            "Σ is unaffected (it lives on the keys)."
        },
    )
    memory_learned_keys: bool = field(
        default=False,
        metadata={
            "help": "Train the memory's key projection P (k x d_in, initialised at the random one, saved with the "
            "generator) instead of keeping it fixed: the write stays a closed-form least-squares solve, what it keys "
            "on is learned, so a smaller k can keep apart the positions a random one blurs. Needs memory_keys > 0 and "
            "memory_background 0 (Σ is measured for one P)."
        },
    )
    memory_scale: float = field(default=8.0, metadata={"help": "eta: strength of the memory update."})
    memory_ridge: float = field(
        default=0.1, metadata={"help": "lambda: ridge term of the memory solve, relative to the mean key energy."}
    )
    memory_targets: str = field(
        default="next",
        metadata={
            "help": "What a memory key maps to: 'next', the output embedding of the token that came next; 'error', "
            "that embedding minus the one the frozen LM expected there (Σ_v p(v) E[v]), a delta-rule write that "
            "stores only what the LM did not already predict."
        },
    )
    memory_background: float = field(
        default=0.0,
        metadata={
            "help": "beta: weight, in tokens, of ordinary text in the memory solve, W = eta C (G + mu I + beta "
            "Sigma)^-1 with Sigma the mean k k^T of the keys over ordinary text (`calibrate_memory`). It costs the "
            "write as if beta tokens of ordinary text had been absorbed with nothing to store, so the memory pushes "
            "positions that look like any text less than those that look like the context; 0 leaves it out."
        },
    )
    norm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of the per-module RMSNorm on H."})
    base_model: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Base LM this generator was built for; states record it and refuse other models."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random initialisation of A1, A2, A3."})

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise GenAdapterError("GeneratorConfig.target_modules must name at least one module")
        if min(self.key_dim, self.value_dim, self.rank, self.chunk_size) < 1:
            raise GenAdapterError("key_dim, value_dim, rank and chunk_size must be positive")
        if self.rank > min(self.key_dim, self.value_dim):
            raise GenAdapterError(
                f"rank {self.rank} exceeds min(key_dim, value_dim) = {min(self.key_dim, self.value_dim)}"
            )
        if self.value_shift < 0:
            raise GenAdapterError(f"value_shift must be 0 or positive, got {self.value_shift}")
        if min(self.memory_layers, self.memory_keys, self.memory_values) < 0:
            raise GenAdapterError("memory_layers, memory_keys and memory_values must be 0 or positive")
        if self.memory_learned_keys and not self.memory_keys:
            raise GenAdapterError("memory_learned_keys trains the key projection P: it needs memory_keys > 0")
        if self.memory_learned_keys and self.memory_background:
            raise GenAdapterError(
                "memory_background's Σ is measured for one key projection and would go stale as learned keys train: "
                "set memory_background to 0 with memory_learned_keys"
            )
        if self.memory_layers and self.memory_module not in self.target_modules:
            raise GenAdapterError(
                f"memory_module {self.memory_module!r} must be one of target_modules {self.target_modules}"
            )
        if self.memory_background < 0:
            raise GenAdapterError(f"memory_background must be 0 or positive, got {self.memory_background}")
        for name in ("memory_ridge", "ridge"):
            if getattr(self, name) <= 0:
                raise GenAdapterError(f"{name} must be positive, got {getattr(self, name)}")
        if self.memory_targets not in MEMORY_TARGETS:
            raise GenAdapterError(f"memory_targets must be one of {MEMORY_TARGETS}, got {self.memory_targets!r}")
        if self.chunk_mode not in CHUNK_MODES:
            raise GenAdapterError(f"chunk_mode must be one of {CHUNK_MODES}, got {self.chunk_mode!r}")
        if self.chunk_split not in CHUNK_SPLITS:
            raise GenAdapterError(f"chunk_split must be one of {CHUNK_SPLITS}, got {self.chunk_split!r}")
        if self.normalization not in NORMALIZATIONS:
            raise GenAdapterError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.value_dim

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """to_dict without fields added after a release that still hold their default: what fingerprints hash, so
        a shipped generator keeps its fingerprint (and the states saved with it stay loadable)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in _LATER_FIELDS}
        return {k: v for k, v in self.to_dict().items() if not (k in defaults and v == defaults[k])}

    def with_overrides(self, overrides: dict | None) -> GeneratorConfig:
        """This config with some OVERRIDABLE fields changed (validated like any config)."""
        check_overrides(overrides or {})
        reshaping = {k: v for k, v in (overrides or {}).items() if k in KEY_PROJECTION_FIELDS and v != getattr(self, k)}
        if self.memory_learned_keys and reshaping and reshaping != {"memory_layers": 0}:
            raise GenAdapterError(
                f"this generator learned its memory key projections: {sorted(reshaping)} cannot change "
                "(memory_layers 0 switches the memory off)"
            )
        return replace(self, **overrides) if overrides else self

    @classmethod
    def from_dict(cls, data: dict) -> GeneratorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise GenAdapterError(f"unknown generator config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise GenAdapterError(f"{path} is not a valid generator config: {exc}") from exc
