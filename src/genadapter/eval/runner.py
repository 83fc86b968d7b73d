"""The evaluation loop shared by the scenarios: template selection on dev, resumable runs, cost records.

An output directory holds
- `run.json`: the settings that make results comparable (model, generator, data, seed, decoding…);
  re-running with other such settings into the same directory is refused;
- `templates.json`: the template each method picked on the dev split (picked once, then reused);
- `records.jsonl`: one line per evaluated item (`kind: item`) and per adapted context (`kind: context`),
  appended after each block of contexts, so a re-run skips everything already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..adapter import GenerativeAdapter
from ..errors import GenAdapterError
from .costs import Meter
from .engine import Engine
from .methods import Adapted, EvalContext, Method, Prompted, SFTConfig
from .report import fmt, markdown_table, mean
from .templates import Template

log = logging.getLogger(__name__)

# 2: one template shared by all methods, picked on their pooled dev split (1: each method picked its own)
PROTOCOL = 2


@dataclass
class CommonConfig:
    """Flags shared by every scenario (see `genadapter eval --help`)."""

    data: Path | None = None
    methods: list[str] = field(default_factory=lambda: ["closed-book", "prompting", "sft", "genadapter"])
    limit: int | None = None  # None: the scenario's default; 0: everything
    skip: int = 0  # test items left out at the head of the seeded order: a fresh sample after a run of --limit skip
    seed: int = 0
    json: Path | None = None
    out: Path | None = None
    base: str | None = None
    generator: Path | None = None
    generator_overrides: dict = field(default_factory=dict)  # config fields no weight depends on (memory_layers…)
    dev: int | None = None  # None: the scenario's default
    template: str | None = None
    batch_size: int = 8
    window: int | None = None
    sft: SFTConfig = field(default_factory=SFTConfig)
    device: str = "cpu"
    dtype: str = "float32"
    share_prefix: bool = True
    plots: bool = True
    progress: bool | None = None  # None: bars only on a terminal
    threads: int | None = None  # torch CPU threads (None: torch's default)
    all_templates: bool = False  # also answer the test items under every candidate template


def load_adapter(config: CommonConfig) -> GenerativeAdapter:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype not in dtypes:
        raise GenAdapterError(f"--dtype must be one of {', '.join(dtypes)}")
    return GenerativeAdapter.from_pretrained(
        base=config.base,
        generator=config.generator,
        dtype=dtypes[config.dtype],
        device=config.device,
        overrides=config.generator_overrides or None,
    )


def file_digest(path: Path) -> str:
    """sha256 of a file, or of the names and sizes of a directory's files."""
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{child.relative_to(path)}:{child.stat().st_size}\n".encode())
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Group:
    """A context and the items asked about it; `info` goes into every record (length, task, k…)."""

    context: EvalContext
    items: list[Any]
    info: dict = field(default_factory=dict)


class Scenario:
    """What a scenario tells the runner: its template slots and how to evaluate rows of items."""

    name = ""
    slots: dict[str, Sequence[Template]] = {}
    dev_metric: dict[str, str] = {}  # slot -> key of the per-item result that picks its template

    def __init__(self, engine: Engine, max_new_tokens: int):
        self.engine = engine
        self.max_new_tokens = max_new_tokens

    def score_options(
        self, method: Method, asks: Sequence[tuple[Adapted, Template, str, Sequence[str]] | None]
    ) -> list[list[tuple[float, Prompted]] | None]:
        """Multiple choice: for each ask (adapted context, template, query, options), the summed log-probability of
        every option (continuation " " + option) after the query, with its prompt; None where the ask is None. All
        options of all asks are scored in one call, each with room kept for its ask's longest option."""
        rows, owners = [], []
        for index, ask in enumerate(asks):
            if ask is not None:
                adapted, template, query, options = ask
                continuations = [" " + option for option in options]
                reserve = max(self.engine.count(c) for c in continuations)
                rows += [(adapted, template, query, c, reserve) for c in continuations]
                owners += [index] * len(continuations)
        scored: list[list[tuple[float, Prompted]] | None] = [None] * len(asks)
        for owner, value in zip(owners, method.score(rows) if rows else [], strict=True):
            scored[owner] = [*(scored[owner] or []), value]
        return scored

    def evaluate(self, method: Method, rows: list[tuple[Adapted, Any]], templates: dict[str, Template]) -> list[dict]:
        """One result dict per row: metrics, prediction, and prompt facts (see `prompt_facts`)."""
        raise NotImplementedError


def prompt_facts(prompted: Sequence, method: Method, adapted: Adapted, answer_tokens: int = 0) -> dict:
    """Token counts, truncation and FLOPs of the prompts one item needed."""
    tokens = sum(p.tokens for p in prompted) + answer_tokens
    return {
        "prompt_tokens": max(p.tokens for p in prompted),
        "truncated": any(p.truncated for p in prompted),
        "dropped_tokens": max(p.dropped_tokens for p in prompted),
        "flops": method.answer_flops(adapted, tokens),
    }


def template_key(templates: dict[str, Template] | dict[str, str]) -> str:
    """One name for the templates of every slot, e.g. 'qa-chat' or 'persona-statement-plain+reply-turn-plain'."""
    return "+".join(t if isinstance(t, str) else t.name for t in templates.values())


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for fewer than two values)."""
    n = len(values)
    if not n:
        return 0.0, 0.0
    mu = sum(values) / n
    if n < 2:
        return mu, 0.0
    return mu, (sum((v - mu) ** 2 for v in values) / (n - 1) / n) ** 0.5


def pick_template(names: Sequence[str], dev: Sequence[dict[str, list[float]]], forced: Template | None = None) -> dict:
    """Choose among `names` (the first is the training format) from dev values {name: per-item values}, one dict per
    method (pooled when several). The best mean wins, unless the two best are within one standard error of their
    paired difference: then the training format is kept, since a dev split cannot tell them apart."""
    pooled = {name: [v for d in dev for v in d.get(name, [])] for name in names}
    stats = {}
    for name, values in pooled.items():
        mu, se = mean_and_se(values)
        stats[name] = {"mean": mu, "se": se, "n": len(values)}
    record: dict[str, Any] = {"dev": stats}
    if forced is not None:
        return {"chosen": forced.name, "how": "forced by --template", **record}
    if not any(pooled.values()):
        return {"chosen": names[0], "how": "training format (no dev items)", **record}
    ranked = sorted(names, key=lambda n: (-stats[n]["mean"], names.index(n)))
    best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    if second is None:
        return {"chosen": best, "how": "the only candidate", **record}
    a, b = pooled[best], pooled[second]
    if len(a) == len(b) and a:
        diff_se = mean_and_se([x - y for x, y in zip(a, b, strict=True)])[1]
    else:
        diff_se = (stats[best]["se"] ** 2 + stats[second]["se"] ** 2) ** 0.5
    gap = stats[best]["mean"] - stats[second]["mean"]
    record["gap_to_second"] = {"template": second, "difference": gap, "se": diff_se}
    if gap <= diff_se:
        how = f"training format: the two best ({best}, {second}) are within one standard error on dev"
        return {"chosen": names[0], "how": how, **record}
    return {"chosen": best, "how": "best mean on the dev split, by more than one standard error", **record}


class Store:
    """Append-only JSONL of finished work: items keyed by method + template + item id, contexts (one adaptation,
    answered under one or more templates) by method + group id."""

    def __init__(self, out: Path):
        self.path = out / "records.jsonl"
        self.items: dict[tuple[str, str, str], dict] = {}
        self.contexts: dict[tuple[str, str], dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: that work is simply redone
                self._index(record)

    def _index(self, record: dict) -> None:
        if record.get("kind") == "item":
            template = record.get("template") or template_key(record.get("templates", {}))
            self.items[(record["method"], template, record["id"])] = record
        elif record.get("kind") == "context":
            self.contexts[(record["method"], record["group"])] = record

    def done(self, method: str, group: Group, templates: Sequence[str]) -> bool:
        return (method, group.context.id) in self.contexts and all(
            (method, t, item.id) in self.items for t in templates for item in group.items
        )

    def add(self, records: list[dict]) -> None:
        with self.path.open("a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for record in records:
            self._index(record)


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        config: CommonConfig,
        out: Path,
        fingerprint: dict,
        progress: bool | None = None,
    ):
        self.scenario = scenario
        self.config = config
        self.out = out
        self.progress = progress
        out.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint(fingerprint)
        self.store = Store(out)
        self.templates_path = out / "templates.json"
        self.templates: dict[str, dict] = (
            json.loads(self.templates_path.read_text()) if self.templates_path.is_file() else {}
        )
        self.skipped: dict[str, int] = {}

    def _check_fingerprint(self, fingerprint: dict) -> None:
        path = self.out / "run.json"
        current = json.loads(json.dumps(fingerprint, default=str))
        if path.is_file():
            previous = json.loads(path.read_text())
            differ = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            if differ:
                raise GenAdapterError(
                    f"{self.out} holds results of other settings ({', '.join(differ)} differ); "
                    "use another --out or delete it"
                )
        else:
            path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")

    # ---- template selection -------------------------------------------------------------------

    def choose_templates(
        self, methods: Sequence[Method], dev_groups: list[Group], forced: dict[str, Template]
    ) -> tuple[dict[str, Template], dict[str, dict[str, Template]]]:
        """(the shared template of every slot, each method's own choice). The shared one is what every method is
        compared under: forced by --template, or picked on the dev items of all methods pooled. Dev scores are
        measured once per method and kept in templates.json, so a resumed run picks the same templates."""
        slots = self.scenario.slots
        by_name = {slot: {t.name: t for t in cands} for slot, cands in slots.items()}
        scores: dict[str, dict[str, dict[str, list[float]]]] = {}  # method -> slot -> template -> dev values
        saved = self.templates.get("dev_scores", {})
        for method in methods:
            if method.name in saved and all(slot in saved[method.name] for slot in slots):
                scores[method.name] = saved[method.name]
            elif sum(len(g.items) for g in dev_groups):
                scores[method.name] = self._dev_scores(method, dev_groups)
                saved[method.name] = scores[method.name]  # kept at once: a killed run does not score it again
                self.templates["dev_scores"] = saved
                self.templates_path.write_text(json.dumps(self.templates, indent=2) + "\n")
        own: dict[str, dict[str, dict]] = {}
        for method in methods:
            own[method.name] = {
                slot: pick_template(
                    [t.name for t in slots[slot]], [scores.get(method.name, {}).get(slot, {})], forced.get(slot)
                )
                for slot in slots
            }
        shared = {
            slot: pick_template([t.name for t in slots[slot]], [s[slot] for s in scores.values()], forced.get(slot))
            for slot in slots
        }
        self.templates = {"shared": shared, "methods": own, "dev_scores": scores}
        self.templates_path.write_text(json.dumps(self.templates, indent=2) + "\n")
        return (
            {slot: by_name[slot][shared[slot]["chosen"]] for slot in slots},
            {m: {slot: by_name[slot][choice[slot]["chosen"]] for slot in slots} for m, choice in own.items()},
        )

    def template_grid(self) -> list[dict[str, Template]]:
        """Every candidate template, one combination per round: round j takes candidate j of every slot (slots are
        scored independently, as on dev)."""
        slots = self.scenario.slots
        rounds = max(len(c) for c in slots.values())
        return [{s: c[min(j, len(c) - 1)] for s, c in slots.items()} for j in range(rounds)]

    def _dev_scores(self, method: Method, groups: list[Group]) -> dict[str, dict[str, list[float]]]:
        """Per-item dev values of every candidate template; contexts are adapted and answered in blocks, as the
        test items are."""
        candidates = self.scenario.slots
        scores: dict[str, dict[str, list[float]]] = {s: {t.name: [] for t in candidates[s]} for s in candidates}
        blocks = self._blocks(method, groups, self.config.batch_size)
        for block in tqdm(blocks, desc=f"{self.scenario.name} {method.name} dev", disable=self._quiet(), leave=False):
            _, _, answered = self._adapt_and_answer(method, block, self.template_grid())
            for j, (_, results, _) in enumerate(answered):
                for slot, cands in candidates.items():
                    if j < len(cands):
                        metric = self.scenario.dev_metric[slot]
                        scores[slot][cands[j].name] += [r[metric] for r in results if r.get(metric) is not None]
        return scores

    @staticmethod
    def _blocks(
        method: Method, groups: list[Group], block: int, block_key: Callable[[Group], Any] | None = None
    ) -> list[list[Group]]:
        """Contexts answered together: up to `block` of them with the same `block_key` (one at a time for a method
        that holds one context's adapter in the model)."""
        step = 1 if method.one_context_at_a_time else max(1, block)
        by_key: dict[Any, list[Group]] = {}
        for group in groups:
            by_key.setdefault(block_key(group) if block_key else None, []).append(group)
        return [same[i : i + step] for same in by_key.values() for i in range(0, len(same), step)]

    def _adapt_and_answer(
        self, method: Method, groups: list[Group], combos: Sequence[dict[str, Template]]
    ) -> tuple[list[Adapted], list[Meter], list[tuple[dict[str, Template], list[dict], Meter]]]:
        """Adapt each context once (metered), then answer all the contexts' items under each set of templates:
        (adapted, their meters, [(templates, one result per item, the answering meter)])."""
        adapted: list[Adapted] = []
        adapt_meters: list[Meter] = []
        answered: list[tuple[dict[str, Template], list[dict], Meter]] = []
        try:
            for group in groups:
                with Meter() as meter:
                    adapted.append(method.adapt(group.context))
                adapt_meters.append(meter)
            rows = [(a, item) for a, g in zip(adapted, groups, strict=True) for item in g.items]
            for templates in combos:
                with Meter() as answer:
                    results = self.scenario.evaluate(method, rows, templates) if rows else []
                answered.append((templates, results, answer))
        finally:
            for a in adapted:
                method.release(a)
        return adapted, adapt_meters, answered

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    # ---- evaluation ---------------------------------------------------------------------------

    def run(
        self,
        method: Method,
        groups: list[Group],
        templates: dict[str, Template] | Sequence[dict[str, Template]],
        block: int = 8,
        block_key: Callable[[Group], Any] | None = None,
    ) -> None:
        """Evaluate every group not finished yet, under one set of templates or several (each context is adapted
        once and answered under each). The contexts of one block (up to `block`, all with the same `block_key`,
        e.g. the same length bin, so latencies stay comparable) are answered together."""
        combos = [templates] if isinstance(templates, dict) else list(templates)
        keys = [template_key(c) for c in combos]
        pending = [g for g in groups if not self.store.done(method.name, g, keys)]
        self.skipped[method.name] = len(groups) - len(pending)
        if not pending:
            return
        blocks = self._blocks(method, pending, block, block_key)
        bar = tqdm(total=len(pending), desc=f"{self.scenario.name} {method.name}", unit="ctx", disable=self._quiet())
        for batch in blocks:
            self.store.add(self._block(method, batch, combos))
            bar.update(len(batch))
        bar.close()

    def _block(self, method: Method, groups: list[Group], combos: list[dict[str, Template]]) -> list[dict]:
        adapted, adapt_meters, answered = self._adapt_and_answer(method, groups, combos)
        items = max(1, sum(len(g.items) for g in groups))
        records = []
        for templates, results, answer in answered:
            latency = answer.seconds / items
            cursor = 0
            for group in groups:
                n = len(group.items)
                for item, result in zip(group.items, results[cursor : cursor + n], strict=True):
                    records.append(
                        {
                            "kind": "item",
                            "method": method.name,
                            "id": item.id,
                            "group": group.context.id,
                            **group.info,
                            **result,
                            "template": template_key(templates),
                            "templates": {s: t.name for s, t in templates.items()},
                            "latency_s": latency,
                        }
                    )
                cursor += n
        _, _, answer = answered[0]  # the context's answering cost under the first (headline) templates
        latency = answer.seconds / items
        for group, a, meter in zip(groups, adapted, adapt_meters, strict=True):
            n = len(group.items)
            records.append(
                {
                    "kind": "context",
                    "method": method.name,
                    "group": group.context.id,
                    **group.info,
                    "context_tokens": group.info.get("context_tokens", 0),
                    "items": n,
                    "adapt_s": meter.seconds,
                    "adapt_peak_mib": meter.peak_mib,
                    "adapt_cuda_peak_mib": meter.cuda_peak_mib,
                    "answer_s": latency * n,
                    "answer_peak_mib": answer.peak_mib,
                    "answer_cuda_peak_mib": answer.cuda_peak_mib,
                    "latency_s": latency,
                    "kept_bytes": a.kept_bytes,
                    "adapt_flops": a.flops,
                    **({"extra": a.extra} if a.extra else {}),
                }
            )
        return records

    # ---- results ------------------------------------------------------------------------------

    def item_records(self, method: str, groups: list[Group], templates: dict[str, Template]) -> list[dict]:
        """The records of `method`'s items answered under `templates`."""
        key = template_key(templates)
        items = self.store.items
        return [items[(method, key, i.id)] for g in groups for i in g.items if (method, key, i.id) in items]

    def context_records(self, method: str, groups: list[Group]) -> list[dict]:
        return [
            self.store.contexts[(method, g.context.id)] for g in groups if (method, g.context.id) in self.store.contexts
        ]


def select_test_items(items: list, skip: int, limit: int, context_of: Callable | None = None) -> list:
    """`limit` items (0: all) after the first `skip` of a seeded order, so that `--skip 80 --limit 80` is a sample
    disjoint from `--limit 80`'s under the same seed. With `context_of`, items sharing a context with a skipped one
    are left out too: a fresh sample has fresh contexts, not new questions on texts already read."""
    if skip < 0:
        raise GenAdapterError(f"--skip must be >= 0, got {skip}")
    seen = {context_of(item) for item in items[:skip]} if context_of else set()
    rest = [item for item in items[skip:] if not context_of or context_of(item) not in seen]
    if skip and not rest:  # past the end, or every item left shares a context with a skipped one
        raise GenAdapterError(f"--skip {skip} leaves no test items (the test split has {len(items)})")
    return rest[:limit] if limit else rest


def fingerprint_of(scenario: str, ga: GenerativeAdapter, config: CommonConfig, data: Path, **extra) -> dict:
    """The settings that must match for results in one output directory to belong together."""
    values = {
        "scenario": scenario,
        "base": ga.base_name,
        "generator": ga.fingerprint,
        "data": str(data),
        "data_digest": file_digest(data),
        "seed": config.seed,
        "dev": config.dev,
        "template": config.template,
        "window": config.window,
        "sft": config.sft.to_dict(),
        "dtype": config.dtype,
        "protocol": PROTOCOL,
    }
    if config.skip:  # only when set, so directories written before --skip existed still resume
        values["skip"] = config.skip
    values.update(extra)
    return values


def config_dict(config: CommonConfig, data: Path, ga, window: int, limit: int, dev: int) -> dict:
    """The run's settings as recorded in the JSON."""
    return {
        "data": str(data),
        "methods": list(config.methods),
        "limit": limit,
        "skip": config.skip,
        "dev": dev,
        "seed": config.seed,
        "template": config.template,
        "batch_size": config.batch_size,
        "window": window,
        "share_prefix": config.share_prefix,
        "all_templates": config.all_templates,
        "sft": config.sft.to_dict(),
        "device": config.device,
        "dtype": config.dtype,
        "threads": config.threads,
        "base": config.base,
        "base_name": ga.base_name,
        "generator": str(config.generator) if config.generator else None,
        "generator_overrides": config.generator_overrides,
        "generator_fingerprint": ga.fingerprint,
        "generator_config": ga.config.to_dict(),
        "out": str(config.out) if config.out else None,
    }


@dataclass
class TemplatePlan:
    """The templates of a run: `shared`, the one every method is compared under (the headline); `own`, what each
    method's dev split alone would have picked; `combos`, every set of templates the test items were answered
    under (the shared one first; all candidates with --all-templates)."""

    shared: dict[str, Template]
    own: dict[str, dict[str, Template]]
    combos: list[dict[str, Template]]


def run_methods(
    runner: Runner,
    methods: Sequence[Method],
    groups_for: Callable[[Method], list[Group]],
    dev_groups: list[Group],
    forced: dict[str, Template],
    all_templates: bool,
    block: int,
    block_key: Callable[[Group], Any] | None = None,
) -> TemplatePlan:
    """Pick the templates, then answer every method's test items under the shared one (and every candidate)."""
    shared, own = runner.choose_templates(methods, dev_groups, forced)
    combos = [shared]
    if all_templates:
        combos += [c for c in runner.template_grid() if template_key(c) != template_key(shared)]
    for method in methods:
        runner.run(method, groups_for(method), combos, block=block, block_key=block_key)
    return TemplatePlan(shared, own, combos)


def template_views(
    runner: Runner, methods: Sequence[Method], groups_for: Callable[[Method], list[Group]], plan: TemplatePlan
) -> tuple[dict, str]:
    """How much the template moves each method: ({method: {template: {metric: test mean}}}, a markdown section).
    The metrics are the ones templates are picked by (the scenario's dev metrics)."""
    metrics = list(dict.fromkeys(runner.scenario.dev_metric.values()))
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for method in methods:
        for combo in plan.combos:
            records = runner.item_records(method.name, groups_for(method), combo)
            if records:
                table.setdefault(method.name, {})[template_key(combo)] = {
                    m: mean([r[m] for r in records if r.get(m) is not None]) for m in metrics
                }

    def cell(method: str, key: str) -> str:
        values = table.get(method, {}).get(key)
        return " / ".join(fmt(values[m]) for m in metrics) if values else "not run (--all-templates)"

    shared_key = template_key(plan.shared)
    how = "; ".join(f"{slot}: {rec['how']}" for slot, rec in runner.templates.get("shared", {}).items())
    lines = [
        f"Every method above is compared under the same template, `{shared_key}` ({how}). "
        f"Cells: test {' / '.join(metrics)}.",
        "",
    ]
    own_rows = []
    for method in methods:
        own_key = template_key(plan.own[method.name])
        dev = runner.templates.get("methods", {}).get(method.name, {})
        dev_text = "; ".join(
            f"{rec['chosen']} {fmt(rec['dev'].get(rec['chosen'], {}).get('mean'))} ± "
            f"{fmt(rec['dev'].get(rec['chosen'], {}).get('se'))} (n {rec['dev'].get(rec['chosen'], {}).get('n', 0)})"
            for rec in dev.values()
        )
        own_rows.append(
            [method.name, own_key, dev_text or "–", cell(method.name, own_key), cell(method.name, shared_key)]
        )
    lines.append("Each method's own choice (a second view: its dev split alone picks the template):")
    lines.append("")
    lines.append(
        markdown_table(["method", "own template", "dev mean ± se (n)", "test, own template", "test, shared"], own_rows)
    )
    if len(plan.combos) > 1:
        keys = [template_key(c) for c in plan.combos]
        lines += ["", "Every candidate template on the test items:", ""]
        lines.append(markdown_table(["method", *keys], [[m.name, *(cell(m.name, k) for k in keys)] for m in methods]))
    return table, "\n".join(lines)
