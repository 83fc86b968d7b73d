"""The authors' FastLoRA generators, read into genadapter's AdapterGenerator (the math stays in generator.py).

The released generator of Chen et al. (Generative-Adapter-Mistral-7B-Instruct-v0.2) is a PEFT-style directory:
`adapter_config.json` with `peft_type: "FASTLORA"` and `adapter_model.safetensors` (or `adapter_model.bin`) holding,
per adapted linear, `fastlora_A1` (R1 × d_in), `fastlora_A2` (R1 × d), `fastlora_A3` (R2 × d), `fastlora_B`
(d_out × R2) and `fastlora_hidden_state_norm` (d), under keys such as
`base_model.model.model.layers.3.base_layer.self_attn.o_proj.fastlora_A1.weight`.

Their forward (fastlora/model.py: FastLoraLinear, FastLoraDecoderLayer; fastlora/eval_utils.py:
fastlora_generate_adaptor) is genadapter's, field for field:

    fastlora_inter_size → key_dim R1 (A1, A2; defaults to fastlora_r)   fastlora_r → value_dim R2 (A3, B)
    fastlora_max_rank → rank r     fastlora_alpha → alpha (scale alpha / fastlora_r = alpha / R2)
    fastlora_window → chunk_size   fastlora_hidden_state_norm.weight → γ of an RMSNorm with eps 1e-6
    fastlora_norm "svd" → normalization "svd"   target_modules (or fastlora_param) → target_modules

and the way their evaluation encodes a context (merge_strategy "sequential") maps onto chunk_mode = "sequential",
chunk_split = "even", context_bos = True (see GeneratorConfig); their "parallel" strategy is chunk_mode
"independent". What is refused is listed in SUPPORTED below. What differs:

- the normaliser: theirs is U Vᵀ of torch.svd_lowrank(S, q=max_rank, niter=1), a randomized SVD drawn afresh at every
  call; genadapter takes the exact top-r factor, which that approximates (and equals when max_rank = min(R1, R2)).
  For a state of rank below max_rank (a context shorter than max_rank tokens) theirs also keeps max_rank − rank
  directions of rounding noise at full weight, which genadapter drops;
- their "concat" strategy (the whole context in one window, their notebook's default) is reproduced only for
  contexts of one window;
- they run in bfloat16; genadapter keeps the states in fp32 in any case.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import GeneratorConfig
from .errors import GenAdapterError, ModelLoadError
from .generator import PEFT_CONFIG_FILE, AdapterGenerator

PEFT_TYPE = "FASTLORA"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# What this loader reads: the released generator's settings. The authors' code never reads fastlora_arch (it is
# stored only), so other values are refused rather than guessed at; their other norms ('frobenius', 'spectral',
# 'softmax', 'attention', batchnorm variants) have other maths or weights.
SUPPORTED = {
    "fastlora_arch": ("aassbb",),
    "fastlora_norm": ("svd",),
    "fastlora_merge": ("pre-norm-sum", "pre-norm-mean"),  # the same adapter: the SVD normaliser ignores scale
}
# The authors' FastLoraConfig defaults, used for keys a config leaves out (as their loader would).
DEFAULTS = {
    "fastlora_r": 32,
    "fastlora_inter_size": None,
    "fastlora_window": 1024,
    "fastlora_max_rank": 128,
    "fastlora_alpha": 64,
    "fastlora_arch": "aassbb",
    "fastlora_norm": "forbenius",
    "fastlora_merge": "mean",
    "fastlora_param": None,
}
# fastlora_* keys with no effect on inference in the authors' code: training-only (dropout, the "abcdabcd" training
# mask), initialisation only, or stored and never read (attn_len, gist_len).
INERT = {
    "fastlora_dropout",
    "fastlora_init",
    "fastlora_training_attention_mask",
    "fastlora_attn_len",
    "fastlora_gist_len",
}
NORM_EPS = 1e-6  # their RMSNorm's default, which FastLoraLinear never changes
_PARTS = {
    "fastlora_A1": "A1",
    "fastlora_A2": "A2",
    "fastlora_A3": "A3",
    "fastlora_B": "B",
    "fastlora_hidden_state_norm": "gamma",
}
_SHORT_NAMES = {"o": "o_proj", "up": "up_proj", "down": "down_proj"}  # their first checkpoints' fastlora_param


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / PEFT_CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    if raw.get("peft_type") != PEFT_TYPE:
        raise ModelLoadError(
            f"{directory} holds a PEFT adapter of type {raw.get('peft_type')!r}, not a generator: genadapter loads its "
            f"own generators and the authors' FastLoRA ones (peft_type {PEFT_TYPE!r})"
        )
    return raw


def generator_config(raw: dict, source: str = "adapter_config.json") -> GeneratorConfig:
    """genadapter's config of a FastLoRA adapter_config.json (refusing what it does not implement)."""
    unknown = sorted(k for k in raw if k.startswith("fastlora_") and k not in DEFAULTS and k not in INERT)
    if unknown:
        raise GenAdapterError(f"{source}: unknown FastLoRA settings {unknown}; genadapter cannot tell what they do")
    values = {**DEFAULTS, **{k: v for k, v in raw.items() if k in DEFAULTS and v is not None}}
    for key, allowed in SUPPORTED.items():
        if values[key] not in allowed:
            raise GenAdapterError(
                f"{source}: {key} = {values[key]!r} is not supported; genadapter implements the released FastLoRA "
                f"generator's {key} {' or '.join(map(repr, allowed))}"
                + (" (the authors' evaluation scripts set pre-norm-sum)" if key == "fastlora_merge" else "")
            )
    if raw.get("lora_r"):
        raise GenAdapterError(f"{source}: lora_r = {raw['lora_r']}: a plain LoRA beside FastLoRA is not supported")
    if raw.get("layer_replication"):
        raise GenAdapterError(f"{source}: layer_replication is not supported")
    targets = raw.get("target_modules") or values["fastlora_param"]
    if isinstance(targets, str) or not targets:
        raise GenAdapterError(f"{source}: target_modules must be a list of module names, got {targets!r}")
    targets = list(dict.fromkeys(_SHORT_NAMES.get(t, t).rsplit(".", 1)[-1] for t in targets))
    r2 = int(values["fastlora_r"])
    r1 = int(values["fastlora_inter_size"] if values["fastlora_inter_size"] is not None else r2)
    if r2 < 1:
        raise GenAdapterError(f"{source}: fastlora_r = {r2}: a FastLoRA generator needs fastlora_r > 0")
    return GeneratorConfig(
        target_modules=targets,
        key_dim=r1,
        value_dim=r2,
        rank=int(values["fastlora_max_rank"]),
        alpha=float(values["fastlora_alpha"]),
        chunk_size=int(values["fastlora_window"]),
        normalization="svd",
        chunk_mode="sequential",
        chunk_split="even",
        context_bos=True,
        norm_eps=NORM_EPS,
        base_model=str(raw.get("base_model_name_or_path") or "unknown"),
    )


def _read_weights(directory: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors and torch.load raise many types on corrupt files
            raise ModelLoadError(f"cannot read FastLoRA weights {path}: {exc}") from exc
    raise ModelLoadError(f"{directory} has no FastLoRA weights ({' or '.join(WEIGHT_FILES)})")


def _parse_key(key: str) -> tuple[int, str, str]:
    """(layer, module suffix, genadapter parameter) of a key like
    'base_model.model.model.layers.3.base_layer.self_attn.o_proj.fastlora_A1.weight'."""
    parts = key.split(".")
    at = next((i for i, p in enumerate(parts) if p.startswith("fastlora_")), None)
    if at is None or at < 1 or parts[at] not in _PARTS or parts[at + 1 :] not in (["weight"], ["default", "weight"]):
        raise GenAdapterError(f"unsupported FastLoRA weight {key!r} (expected {sorted(_PARTS)} weights only)")
    layers = [i for i, p in enumerate(parts[:at]) if p == "layers" and i + 1 < at and parts[i + 1].isdigit()]
    if not layers:
        raise GenAdapterError(f"cannot tell which decoder layer FastLoRA weight {key!r} belongs to")
    return int(parts[layers[-1] + 1]), parts[at - 1], _PARTS[parts[at]]


def load_fastlora(directory: str | Path, model: nn.Module, overrides: dict | None = None) -> AdapterGenerator:
    """An authors' FastLoRA generator directory as a genadapter generator for `model`; `overrides` as in
    AdapterGenerator.load (e.g. {"chunk_mode": "independent"} to encode chunks independently)."""
    directory = Path(directory)
    config = generator_config(read_config(directory), str(directory / PEFT_CONFIG_FILE)).with_overrides(overrides)
    generator = AdapterGenerator.for_model(model, config)
    by_place = {(spec.layer, name.rsplit(".", 1)[-1]): name for name, spec in generator.targets.items()}
    found: dict[tuple[str, str], Tensor] = {}
    for key, tensor in _read_weights(directory).items():
        if "fastlora_" not in key:
            continue
        layer, suffix, part = _parse_key(key)
        if (layer, suffix) not in by_place:
            raise ModelLoadError(f"FastLoRA weight {key!r} is for a module this base model has no target for")
        name = by_place[layer, suffix]
        if (name, part) in found:
            raise ModelLoadError(f"{directory} holds two FastLoRA weights for {part} of {name}")
        expected = getattr(generator.block(name), part).shape
        if tensor.shape != expected:
            raise ModelLoadError(
                f"FastLoRA weight {key!r} has shape {tuple(tensor.shape)}; this base model needs {tuple(expected)}"
            )
        found[name, part] = tensor
    missing = [(name, part) for name in generator.module_names for part in _PARTS.values() if (name, part) not in found]
    if missing:
        name, part = missing[0]
        raise ModelLoadError(f"{directory} lacks {len(missing)} FastLoRA weights, e.g. {part} of {name}")
    with torch.no_grad():
        for (name, part), tensor in found.items():
            getattr(generator.block(name), part).copy_(tensor.float())
    return generator
