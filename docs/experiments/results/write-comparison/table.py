"""The write-comparison table from the arms' files here.

Usage: python docs/experiments/results/write-comparison/table.py ARM..."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES, HIDDEN = 60, 576  # adapted modules of SmolLM2-135M (o_proj + down_proj, 30 layers); its hidden width


def state_bytes(cfg: dict) -> int:
    """fp32 bytes of one context's state: S (R1 x R2 per module, and G with the ridge write) plus the memory's C, G."""
    size = MODULES * cfg["key_dim"] * cfg["value_dim"] * 4 * (2 if cfg["normalization"] == "ridge" else 1)
    if cfg.get("memory_layers"):
        size += cfg["memory_layers"] * (HIDDEN * cfg["memory_keys"] + cfg["memory_keys"] ** 2) * 4
    return size


def row(arm: str) -> str:
    d = HERE / arm
    m = json.loads((d / "heldout_metrics.json").read_text())
    steps = [r for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "elapsed_s" in r]
    cfg = json.loads((d / "generator_config.json").read_text())

    def pair(key: str, digits: int = 2) -> str:
        return f"{m[key + '_adapter']:.{digits}f} / {m[key + '_other_context']:.{digits}f}"

    cells = [
        arm,
        str(steps[-1]["step"]),
        f"{steps[-1]['elapsed_s']:.0f}",
        f"{pair('reconstruction', 3)} / {m['reconstruction_base']:.3f}",
        f"{m['reconstruction_other_context'] - m['reconstruction_adapter']:+.4f}",
        f"{pair('completion', 3)} / {m['completion_base']:.3f}",
        pair("facts_nll"),
        pair("facts_open_nll"),
        pair("counterfactual_nll"),
        *(
            f"{m[k + '_f1_adapter']:.1f} ({m[k + '_f1_other_context']:.1f})"
            for k in ("facts", "facts_open", "counterfactual")
        ),
        f"{m['cloze_f1_adapter']:.1f}",
        f"{state_bytes(cfg) / 2**20:.1f} MiB",
    ]
    return "| " + " | ".join(cells) + " |"


print(
    "| arm | steps | train s | reconstruction own / other / bare | gap vs other | completion own / other / bare | "
    "facts NLL own / other | facts_open NLL own / other | counterfactual NLL own / other | F1 facts | F1 facts_open | "
    "F1 counterfactual | cloze F1 | state per context |"
)
print("|---" * 14 + "|")
for arm in sys.argv[1:]:
    print(row(arm))
