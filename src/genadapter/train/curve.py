"""Scaling curves: a long run's milestone metrics against the training tokens seen, and where the trend reaches a goal.

A run with `milestone_tokens` keeps output_dir/milestones/<tokens>/ with the generator and its held-out metrics. Any
evaluation written into a milestone's subfolder (`genadapter eval … --generator M --out M/tweetqa`) joins the curve as
`<subfolder>/<method>/<metric>`, e.g. `tweetqa/genadapter/f1`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import GenAdapterError


@dataclass
class LogFit:
    """metric ≈ intercept + slope · log10(tokens), least squares over the milestones."""

    intercept: float
    slope: float
    points: int

    def tokens_to_reach(self, target: float) -> float | None:
        """Tokens at which the fitted trend reaches `target` (None when it never does: a flat or falling trend)."""
        if self.slope <= 0:
            return None
        exponent = (target - self.intercept) / self.slope
        return 10.0**exponent if exponent < 300 else math.inf


def milestone_rows(run_dir: str | Path) -> list[dict[str, float]]:
    """One row per milestone, by tokens: its held-out metrics plus every evaluation in its subfolders."""
    root = Path(run_dir) / "milestones"
    if not root.is_dir():
        raise GenAdapterError(f"{run_dir} has no milestones/ (train with milestone_tokens set)")
    rows = []
    for directory in sorted((d for d in root.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        metrics = directory / "heldout_metrics.json"
        if not metrics.is_file():
            continue  # a milestone being written
        row = {"tokens": int(directory.name), **json.loads(metrics.read_text())}
        for result in sorted(directory.glob("*/results.json")):
            for method, values in json.loads(result.read_text()).get("metrics", {}).items():
                for key, value in values.items():
                    if isinstance(value, int | float):
                        row[f"{result.parent.name}/{method}/{key}"] = value
        rows.append(row)
    if not rows:
        raise GenAdapterError(f"{root} has no finished milestone yet")
    return rows


def fit_log_tokens(rows: list[dict[str, float]], metric: str) -> LogFit | None:
    """The log-linear trend of `metric` over the milestones that have it (None with fewer than two)."""
    points = [(row["tokens"], row[metric]) for row in rows if row.get(metric) is not None]
    if len({tokens for tokens, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit(np.log10([t for t, _ in points]), [v for _, v in points], 1)
    return LogFit(float(intercept), float(slope), len(points))


def write_curve(
    run_dir: str | Path, metrics: list[str], target: float | None = None, out: str | Path | None = None
) -> dict:
    """Write curve.json, curve.md and curve.png (one panel per metric) for `metrics`; with `target`, say at how
    many tokens the first metric's trend reaches it. Returns the curve.json content."""
    rows = milestone_rows(run_dir)
    available = sorted({key for row in rows for key in row if key != "tokens"})
    missing = [m for m in metrics if m not in available]
    if missing:
        raise GenAdapterError(f"no milestone has {missing}; available: {', '.join(available)}")
    out = Path(out or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    fits = {m: fit_log_tokens(rows, m) for m in metrics}
    result: dict = {
        "run": str(run_dir),
        "points": [{"tokens": row["tokens"], **{m: row.get(m) for m in metrics}} for row in rows],
        "fits": {m: asdict(fit) if fit else None for m, fit in fits.items()},
    }
    if target is not None:
        fit = fits[metrics[0]]
        result["target"] = {
            "metric": metrics[0],
            "value": target,
            "tokens": fit.tokens_to_reach(target) if fit else None,
        }
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "curve.md").write_text(_markdown(result, metrics))
    _plot(out / "curve.png", result, metrics)
    return result


def _markdown(result: dict, metrics: list[str]) -> str:
    lines = ["| tokens | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for point in result["points"]:
        values = ["" if point[m] is None else f"{point[m]:.4g}" for m in metrics]
        lines.append(f"| {point['tokens']:,} | " + " | ".join(values) + " |")
    lines.append("")
    for metric, fit in result["fits"].items():
        if fit:
            lines.append(
                f"- {metric} ≈ {fit['intercept']:.4g} + {fit['slope']:.4g} · log10(tokens) ({fit['points']} points)"
            )
    target = result.get("target")
    if target:
        reach = target["tokens"]
        said = "the trend never reaches it" if reach is None else f"the trend reaches it at {reach:,.0f} tokens"
        lines.append(f"- {target['metric']} = {target['value']}: {said}")
    return "\n".join(lines) + "\n"


def _plot(path: Path, result: dict, metrics: list[str]) -> None:
    try:
        import matplotlib
    except ImportError:
        warnings.warn("curve.png skipped: matplotlib is missing (pip install 'genadapter[eval]')", stacklevel=2)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        points = [(p["tokens"], p[metric]) for p in result["points"] if p[metric] is not None]
        ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label="milestones")
        fit = result["fits"][metric]
        if fit:
            xs = np.geomspace(points[0][0], points[-1][0], 50)
            ax.plot(xs, fit["intercept"] + fit["slope"] * np.log10(xs), linestyle="--", label="log-linear fit")
        target = result.get("target")
        if target and target["metric"] == metric:
            ax.axhline(target["value"], color="grey", linestyle=":", label=f"target {target['value']}")
        ax.set_xscale("log")
        ax.set(xlabel="training tokens", ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
