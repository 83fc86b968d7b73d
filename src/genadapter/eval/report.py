"""Results: one JSON file, a markdown table and PNG plots per scenario, plus cost summaries."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path

from ..data import data_root
from ..fileio import write_atomic
from .costs import FLOPS_METHOD, MEMORY_METHOD

log = logging.getLogger(__name__)


# ---- costs ----------------------------------------------------------------------------------------


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def portable_path(path: str | None) -> str | None:
    """A data path as a reader of the report can use it: files of the shared data folder as ../shared/data/…"""
    if path is None:
        return None
    try:
        return f"../shared/data/{Path(path).resolve().relative_to(data_root().resolve())}"
    except ValueError:
        return str(path)


def cost_summary(contexts: list[dict], items: list[dict]) -> dict:
    """Per-method cost figures over the contexts and items of a run."""
    adapted = [c for c in contexts if c.get("context_tokens", 0) > 0] or contexts

    def peak(key: str) -> float | None:
        values = [c[key] for c in contexts if c.get(key) is not None]
        return max(values) if values else None

    tokens = sum(c.get("context_tokens", 0) for c in adapted)
    adapt_total = sum(c["adapt_s"] for c in adapted)
    return {
        "contexts": len(contexts),
        "items": len(items),
        "adapt_s_mean": mean([c["adapt_s"] for c in adapted]),
        "adapt_s_per_1k_context_tokens": 1000 * adapt_total / tokens if tokens else None,
        "latency_s_mean": mean([i["latency_s"] for i in items]),
        "adapt_peak_rss_mib_max": peak("adapt_peak_mib"),
        "answer_peak_rss_mib_max": peak("answer_peak_mib"),
        "adapt_peak_cuda_mib_max": peak("adapt_cuda_peak_mib"),
        "answer_peak_cuda_mib_max": peak("answer_cuda_peak_mib"),
        "kept_bytes_mean": mean([c["kept_bytes"] for c in adapted]),
        "adapt_gflops_mean": _giga(mean([c["adapt_flops"] for c in adapted])),
        "answer_gflops_per_item_mean": _giga(mean([i.get("flops") for i in items])),
        "prompt_tokens_mean": mean([i.get("prompt_tokens") for i in items]),
        "truncated_items": sum(1 for i in items if i.get("truncated")),
        "dropped_context_tokens_mean": mean([i.get("dropped_tokens", 0) for i in items]),
    }


def _giga(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def cost_by_length(contexts: list[dict]) -> list[dict]:
    """Mean costs per context length (rounded to its bin), for the cost-vs-length plot and table."""
    rows: dict[int, list[dict]] = defaultdict(list)
    for c in contexts:
        rows[int(c.get("length", c.get("context_tokens", 0)))].append(c)
    return [
        {
            "length": length,
            "contexts": len(group),
            "adapt_s": mean([c["adapt_s"] for c in group]),
            "latency_s": mean([c["latency_s"] for c in group]),
            "kept_bytes": mean([c["kept_bytes"] for c in group]),
            "adapt_peak_mib": max(c["adapt_peak_mib"] for c in group),
        }
        for length, group in sorted(rows.items())
    ]


# ---- environment ----------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("genadapter", "torch", "transformers", "peft", "matplotlib"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def machine(device: str) -> dict:
    import psutil
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
    }
    if torch.cuda.is_available() and device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def jsonable(value):
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# ---- writing --------------------------------------------------------------------------------------


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def human_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(metrics: dict, costs: dict, metric_keys: Sequence[str], templates: dict) -> str:
    """The headline table: every method under the same templates (`templates`: slot -> Template), named in it."""
    shared = "+".join(t.name for t in templates.values()) or "–"
    header = [
        "method",
        *metric_keys,
        "n",
        "adapt s",
        "latency s/item",
        "peak MiB (adapt/answer)",
        "kept per context",
        "GFLOPs adapt",
        "GFLOPs/item",
        "truncated",
        "template",
    ]
    rows = []
    for method, values in metrics.items():
        c = costs.get(method, {})
        rows.append(
            [
                method,
                *(fmt(values.get(k)) for k in metric_keys),
                values.get("n", "–"),
                fmt(c.get("adapt_s_mean"), 2),
                fmt(c.get("latency_s_mean"), 3),
                f"{fmt(c.get('adapt_peak_rss_mib_max'), 0)} / {fmt(c.get('answer_peak_rss_mib_max'), 0)}",
                human_bytes(c.get("kept_bytes_mean")),
                fmt(c.get("adapt_gflops_mean"), 1),
                fmt(c.get("answer_gflops_per_item_mean"), 1),
                c.get("truncated_items", 0),
                shared,
            ]
        )
    return markdown_table(header, rows)


def write_results(
    out: Path,
    json_path: Path | None,
    result: dict,
    markdown_sections: list[tuple[str, str]],
    plots: list[tuple[str, Callable[[Path], bool]]],
    make_plots: bool = True,
) -> dict:
    """Write results.json (or json_path), results.md and the PNGs; return the result dict."""
    result = jsonable(result)
    result.setdefault("notes", []).extend(
        [f"memory: {MEMORY_METHOD}", f"flops: {FLOPS_METHOD}", "latency: answering time of a batch / its items"]
    )
    png = []
    if make_plots:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            log.warning("plots skipped: matplotlib is missing (pip install 'genadapter[eval]')")
        else:
            for name, draw in plots:
                path = out / name
                if draw(path):
                    png.append(name)
    result["plots"] = png
    md = [f"# genadapter eval: {result['scenario']}", ""]
    md += [
        f"base `{result['config'].get('base_name')}`, generator `{result['config'].get('generator_fingerprint')}`, "
        f"data `{portable_path(result['config'].get('data'))}`",
        "",
    ]
    for title, body in markdown_sections:
        md += [f"## {title}", "", body, ""]
    md += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    md += [f"![{p}]({p})" for p in png]
    (out / "results.md").write_text("\n".join(md) + "\n")
    target = json_path or out / "results.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(result, indent=2) + "\n"
    write_atomic(target, lambda tmp: tmp.write_text(data))
    return result


# ---- plots ----------------------------------------------------------------------------------------


def _figure(panels: int = 1):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    return plt, fig, list(axes[0])


def line_plot(path: Path, series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> bool:
    if not any(series.values()):
        return False
    plt, fig, (ax,) = _figure()
    xs = sorted({x for points in series.values() for x, _ in points})
    for method, points in series.items():
        if points:
            points = sorted(points)
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
    if xs and xs[0] > 0 and xs[-1] / xs[0] >= 8:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cost_plot(path: Path, by_method: dict[str, list[dict]], xlabel: str = "context tokens") -> bool:
    """Adaptation seconds, per-item latency and bytes kept vs context length, one line per method."""
    if not any(by_method.values()):
        return False
    plt, fig, axes = _figure(3)
    panels = [("adapt_s", "adaptation s / context"), ("latency_s", "latency s / item"), ("kept_bytes", "bytes kept")]
    for ax, (key, label) in zip(axes, panels, strict=True):
        for method, rows in by_method.items():
            points = [(r["length"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
        ax.set(xlabel=xlabel, ylabel=label)
        ax.grid(alpha=0.3)
        if key == "kept_bytes":
            ax.set_yscale("symlog")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def bar_plot(path: Path, metrics: dict[str, dict], keys: Sequence[str], title: str) -> bool:
    if not metrics:
        return False
    plt, fig, (ax,) = _figure()
    methods = list(metrics)
    width = 0.8 / max(1, len(keys))
    for j, key in enumerate(keys):
        values = [metrics[m].get(key) or 0.0 for m in methods]
        ax.bar([i + j * width for i in range(len(methods))], values, width=width, label=key)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(methods))], methods)
    ax.set(title=title, ylabel="%")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def template_plot(path: Path, sensitivity: dict[str, dict[str, dict]], metric: str) -> bool:
    """Test `metric` of each method under each template it was answered with (the template sensitivity)."""
    keys = list(dict.fromkeys(k for by_template in sensitivity.values() for k in by_template))
    if len(keys) < 2:
        return False
    values = {m: {k: (v.get(k) or {}).get(metric) for k in keys} for m, v in sensitivity.items()}
    return bar_plot(path, values, keys, f"{metric} by template")
