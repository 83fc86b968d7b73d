"""Paired comparison of two evaluation runs: `genadapter eval compare RUN_A RUN_B`.

Two generators asked the same 100 SQuAD questions differ by a few F1 points by chance alone, so a
difference of means says little. Pairing item by item removes the spread between questions, and a
bootstrap over the paired differences gives an interval for the mean difference (B − A) without
assuming a distribution. Items are matched by their id in `records.jsonl`; only items both runs
scored with the metric count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import GenAdapterError
from .runner import Store

PREFERRED_METRICS = ("contains", "f1", "accuracy", "recall_acc", "reply_f1", "em")


def item_scores(
    run: Path, method: str, metric: str | None, only: dict[str, str] | None = None, template: str | None = None
) -> tuple[dict[str, float], str, str]:
    """({item id: metric value}, the metric used, the template used) of one method in a run directory. The metric
    defaults to the first preferred one present; the template to the only one the method was answered with, or
    else the run's shared template. `only` keeps the items whose record fields have the given values (compared as
    text, e.g. {"k": "16"})."""
    path = run / "records.jsonl"
    if not path.is_file():
        raise GenAdapterError(f"{run} has no records.jsonl: is it the --out directory of a `genadapter eval` run?")
    store = Store(run)  # parses records.jsonl as a resumed run would, skipping a line cut short
    by_template: dict[str, list[dict]] = {}
    for (m, t, _), r in store.items.items():
        if m == method:
            by_template.setdefault(t, []).append(r)
    if not by_template:
        methods = ", ".join(sorted({m for m, _, _ in store.items})) or "none"
        raise GenAdapterError(f"{run} has no items of method {method!r} (it has: {methods})")
    if template is None:
        template = next(iter(by_template)) if len(by_template) == 1 else shared_template(run)
    if template not in by_template:
        answered = ", ".join(sorted(by_template))
        raise GenAdapterError(f"{method!r} in {run} was not answered with template {template!r} (it was: {answered})")
    items = by_template[template]
    for key, value in (only or {}).items():
        if not any(key in r for r in items):
            raise GenAdapterError(f"the items of {method!r} in {run} have no field {key!r}")
        items = [r for r in items if str(r.get(key)) == value]
        if not items:
            raise GenAdapterError(f"no item of {method!r} in {run} has {key}={value}")
    numeric = sorted({k for r in items for k, v in r.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    if metric is None:
        metric = next((m for m in PREFERRED_METRICS if m in numeric), None)
        if metric is None:
            raise GenAdapterError(f"no known metric in {path}; pick one with --metric ({', '.join(numeric)})")
    elif metric not in numeric:
        raise GenAdapterError(f"{path} has no metric {metric!r} for {method!r}; it has: {', '.join(numeric)}")
    return {r["id"]: float(r[metric]) for r in items if r.get(metric) is not None}, metric, template


def shared_template(run: Path) -> str | None:
    """The template every method of a run was compared under (templates.json), or None for older runs."""
    path = run / "templates.json"
    shared = json.loads(path.read_text()).get("shared") if path.is_file() else None
    return "+".join(slot["chosen"] for slot in shared.values()) if shared else None


@dataclass
class PairedComparison:
    metric: str
    n: int  # items scored in both runs
    only_a: int  # items only run A scored (left out)
    only_b: int
    mean_a: float
    mean_b: float
    difference: float  # mean of B − A over the paired items
    low: float  # bootstrap percentile interval of the difference
    high: float
    confidence: float
    b_better: int  # items where B scored higher
    b_worse: int
    resamples: int
    seed: int
    template_a: str = ""
    template_b: str = ""

    def describe(self) -> str:
        """One paragraph for a terminal or a results note."""
        interval = f"{100 * self.confidence:g}% interval [{self.low:+.2f}, {self.high:+.2f}]"
        verdict = "no clear difference" if self.low <= 0 <= self.high else ("B higher" if self.low > 0 else "B lower")
        left_out = (
            f"; {self.only_a} items only in A and {self.only_b} only in B left out"
            if self.only_a or self.only_b
            else ""
        )
        same = self.template_a == self.template_b
        templates = (
            f"template {self.template_a or '?'}" if same else f"templates A {self.template_a}, B {self.template_b}"
        )
        return (
            f"{self.metric} over {self.n} paired items ({templates}): A {self.mean_a:.2f}, B {self.mean_b:.2f}, "
            f"B − A {self.difference:+.2f}, {interval}: {verdict}. "
            f"B better on {self.b_better}, worse on {self.b_worse}, tied on {self.n - self.b_better - self.b_worse}"
            f"{left_out}."
        )


def paired_bootstrap(
    a: dict[str, float],
    b: dict[str, float],
    metric: str = "score",
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Compare scores keyed by item id: mean difference B − A and its bootstrap percentile interval."""
    if resamples < 1:
        raise GenAdapterError("resamples must be at least 1")
    if not 0 < confidence < 1:
        raise GenAdapterError(f"confidence must be between 0 and 1, got {confidence}")
    ids = sorted(a.keys() & b.keys())
    if not ids:
        raise GenAdapterError("the two runs share no scored item: were they run on the same data, seed and --limit?")
    xa = np.array([a[i] for i in ids])
    xb = np.array([b[i] for i in ids])
    diff = xb - xa  # [n]
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)  # [resamples]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedComparison(
        metric=metric,
        n=len(ids),
        only_a=len(a.keys() - b.keys()),
        only_b=len(b.keys() - a.keys()),
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        difference=float(diff.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        b_better=int((diff > 0).sum()),
        b_worse=int((diff < 0).sum()),
        resamples=resamples,
        seed=seed,
    )


def compare_runs(
    run_a: Path,
    run_b: Path,
    method: str = "genadapter",
    method_b: str | None = None,
    metric: str | None = None,
    only: dict[str, str] | None = None,
    template: str | None = None,
    template_b: str | None = None,
    across_templates: bool = False,
    **bootstrap,
) -> PairedComparison:
    """Paired comparison of `method` in run A with `method_b` (default the same) in run B. Both must have answered
    under the same template, unless `across_templates`: otherwise the template's effect would pass for the method's."""
    a, metric, used_a = item_scores(run_a, method, metric, only, template)
    b, _, used_b = item_scores(run_b, method_b or method, metric, only, template_b or template)
    if used_a != used_b and not across_templates:
        raise GenAdapterError(
            f"A was answered with template {used_a!r} and B with {used_b!r}: the difference would mix the template's "
            "effect into the method's. Compare runs under one template (--template), or pass --across-templates"
        )
    comparison = paired_bootstrap(a, b, metric=metric, **bootstrap)
    comparison.template_a, comparison.template_b = used_a, used_b
    return comparison


def comparison_json(
    comparison: PairedComparison, run_a: Path, run_b: Path, method: str, method_b: str, only: dict | None = None
) -> str:
    return json.dumps(
        {
            "a": {"run": str(run_a), "method": method, "template": comparison.template_a},
            "b": {"run": str(run_b), "method": method_b, "template": comparison.template_b},
            "only": only or {},
            **asdict(comparison),
        },
        indent=2,
    )
