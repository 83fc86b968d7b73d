"""Ablation: short runs of equal budget that each change one design choice, scored on the same held-out set.

Two groups. *Design* variants train from scratch with the pretraining recipe (target modules, normalisation,
which self-supervised tasks); *objective* variants start from one generator and continue with instruction
tuning only (answer loss vs context distillation). Every run is an ordinary `train()` run in its own folder,
so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .config import TrainConfig
from .loop import train

# name -> (group, TrainConfig overrides; "generator" overrides are merged into the generator config)
VARIANTS: dict[str, tuple[str, dict]] = {
    "o_proj+down_proj, SVD, recon+compl": ("design", {}),
    "o_proj only": ("design", {"generator": {"target_modules": ["o_proj"]}}),
    "Frobenius normalisation": ("design", {"generator": {"normalization": "frobenius"}}),
    "reconstruction only": ("design", {"completion": False}),
    "completion only": ("design", {"reconstruction": False}),
    "answer loss": ("objective", {"objective": "answer"}),
    "context distillation": ("objective", {"objective": "distill"}),
}

METRICS = ("completion", "reconstruction", "qa_nll")


def variant_config(base: TrainConfig, name: str, out: Path, steps: int, init_generator: str | None) -> TrainConfig:
    group, overrides = VARIANTS[name]
    overrides = dict(overrides)
    generator = replace(base.generator, **overrides.pop("generator", {}))
    recipe = (
        {"recipe": "pretrain"}
        if group == "design"
        else {
            "recipe": "instruct",
            "pretrain_every": 0,
            "init_generator": init_generator,
        }
    )
    folder = out / name.replace(" ", "_").replace(",", "").replace("+", "_")
    return replace(base, **recipe, **overrides, generator=generator, steps=steps, output_dir=str(folder))


def run_ablation(
    base: TrainConfig,
    out: str | Path,
    design_steps: int,
    objective_steps: int,
    init_generator: str | None,
    names: list[str] | None = None,
) -> list[dict]:
    """Train every variant (skipping finished ones), then write ablation.json and ablation.md into `out`."""
    out = Path(out)
    rows = []
    for name in names or list(VARIANTS):
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        group = VARIANTS[name][0]
        if group == "objective" and not init_generator:
            raise ValueError("objective variants continue from a generator: pass init_generator")
        config = variant_config(base, name, out, design_steps if group == "design" else objective_steps, init_generator)
        metrics_file = Path(config.output_dir) / "generator" / "heldout_metrics.json"
        if not metrics_file.is_file():
            train(config)
        rows.append({"variant": name, "group": group, "steps": config.steps, **json.loads(metrics_file.read_text())})
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Held-out loss with the adapter, the gain over no adapter, and the part of it that needs the right context."""
    header = ["variant", "group", "steps"]
    for metric in METRICS:
        header += [f"{metric} adapter", f"{metric} gain vs base", f"{metric} gain vs other context"]
    header.append("cloze F1")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], row["group"], str(row["steps"])]
        for metric in METRICS:
            adapter = row[f"{metric}_adapter"]
            cells += [
                f"{adapter:.3f}",
                f"{row[f'{metric}_base'] - adapter:+.3f}",
                f"{row[f'{metric}_other_context'] - adapter:+.3f}",
            ]
        cells.append(f"{row['cloze_f1_adapter']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
