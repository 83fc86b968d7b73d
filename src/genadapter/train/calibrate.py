"""Switch on the next-token memory's background term of a finished generator: measure Σ on ordinary text and write
a new generator directory with it, so the term can be tried (or shipped) without retraining."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..adapter import GenerativeAdapter
from ..data import HELDOUT_WIKI_LEADS
from ..errors import GenAdapterError
from ..fileio import check_replaceable_dir, write_dir_atomic
from ..generator import CONFIG_FILE
from .data import pretrain_documents


def calibrate_generator(
    generator: Path,
    out: Path,
    background: float = 64.0,
    tokens: int = 16384,
    texts: dict[str, str] | None = None,
    heldout_docs: int = HELDOUT_WIKI_LEADS,
    half: bool = False,
    base: str | None = None,
    overrides: dict | None = None,
) -> tuple[int, str]:
    """Write `generator` with memory_background = `background` and Σ measured on `tokens` tokens of `texts` ({source
    name: text}; default: the pretraining text's training split) to `out`, with `overrides` (OVERRIDABLE config
    fields) applied first: the strength η a generator ships at may differ from the one it was trained at, and a new
    memory_keys needs its own Σ. Returns (tokens read, new fingerprint). A calibration.json beside the weights
    records what Σ was measured on."""
    if not (generator / CONFIG_FILE).is_file():
        raise GenAdapterError(f"{generator} is not a generator directory (no {CONFIG_FILE})")
    check_replaceable_dir(out, CONFIG_FILE)  # before minutes of measuring, not after
    if texts:
        documents, source = list(texts.values()), list(texts)
    else:
        documents, source = pretrain_documents(heldout_docs), f"pretrain_documents(heldout={heldout_docs})"
    given = dict(overrides or {})
    ga = GenerativeAdapter.from_pretrained(
        base=base, generator=generator, overrides=given | {"memory_background": background}
    )
    measured = ga.calibrate_memory(documents, max_tokens=tokens, progress=True)
    record = {"source": str(generator), "text": source, "tokens": measured, "memory_background": background}
    record |= {"overrides": given} if given else {}

    def write(directory: Path) -> None:
        ga.generator.save(directory, dtype=torch.float16 if half else torch.float32)
        if (generator / "train_config.json").is_file():  # how the weights were trained, for `train heldout`
            shutil.copy(generator / "train_config.json", directory / "train_config.json")
        (directory / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")

    write_dir_atomic(out, write, CONFIG_FILE)
    return measured, ga.fingerprint
