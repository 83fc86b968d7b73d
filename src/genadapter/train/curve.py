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

MIN_TREND_POINTS = 3  # a line through two milestones fits them exactly: no evidence of a trend


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


def _points(rows: list[dict[str, float]], metric: str) -> list[tuple[float, float]]:
    return [(row["tokens"], row[metric]) for row in rows if row.get(metric) is not None]


def _fit(points: list[tuple[float, float]]) -> LogFit | None:
    if len({tokens for tokens, _ in points}) < 2:
        return None
    slope, intercept = np.polyfit(np.log10([t for t, _ in points]), [v for _, v in points], 1)
    return LogFit(float(intercept), float(slope), len(points))


def fit_log_tokens(rows: list[dict[str, float]], metric: str) -> LogFit | None:
    """The log-linear trend of `metric` over the milestones that have it (None with fewer than two)."""
    return _fit(_points(rows, metric))


def reach_range(rows: list[dict[str, float]], metric: str, target: float) -> tuple[float, float] | None:
    """Fewest and most tokens at which the trend reaches `target` when any one milestone is left out (inf: a
    left-out fit never reaches it): how much the extrapolation rests on single points. None with fewer than
    MIN_TREND_POINTS milestones, where leaving one out leaves no trend to speak of."""
    points = _points(rows, metric)
    if len(points) < MIN_TREND_POINTS:
        return None
    reached = []
    for left_out in range(len(points)):
        fit = _fit(points[:left_out] + points[left_out + 1 :])
        tokens = fit.tokens_to_reach(target) if fit else None
        reached.append(math.inf if tokens is None else tokens)
    return min(reached), max(reached)


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
        enough = fit is not None and fit.points >= MIN_TREND_POINTS
        result["target"] = {
            "metric": metrics[0],
            "value": target,
            "tokens": _finite(fit.tokens_to_reach(target)) if enough else None,
            "leave_one_out": [_finite(t) for t in reach_range(rows, metrics[0], target) or []] or None,
            "points": fit.points if fit else 0,
        }
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "curve.md").write_text(_markdown(result, metrics))
    _plot(out / "curve.png", result, metrics)
    return result


def _finite(tokens: float | None) -> float | None:
    """JSON has no infinity: a trend that never reaches the target is null."""
    return None if tokens is None or math.isinf(tokens) else tokens


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
        reach, spread = target["tokens"], target["leave_one_out"]
        if target["points"] < MIN_TREND_POINTS:
            said = f"{target['points']} milestone(s) have it; a trend needs at least {MIN_TREND_POINTS}"
        elif reach is None:
            said = "the trend never reaches it"
        else:
            said = f"the trend reaches it at {reach:,.0f} tokens"
        if spread:
            said += "; leaving one milestone out: " + " to ".join("never" if t is None else f"{t:,.0f}" for t in spread)
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
