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
from .methods import Adapted, EvalContext, Method, SFTConfig
from .templates import Template

log = logging.getLogger(__name__)


@dataclass
class CommonConfig:
    """Flags shared by every scenario (see `genadapter eval --help`)."""

    data: Path | None = None
    methods: list[str] = field(default_factory=lambda: ["closed-book", "prompting", "sft", "genadapter"])
    limit: int | None = None  # None: the scenario's default; 0: everything
    seed: int = 0
    json: Path | None = None
    out: Path | None = None
    base: str | None = None
    generator: Path | None = None
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


def load_adapter(config: CommonConfig) -> GenerativeAdapter:
    import torch

    if config.threads:
        torch.set_num_threads(config.threads)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.dtype not in dtypes:
        raise GenAdapterError(f"--dtype must be one of {', '.join(dtypes)}")
    return GenerativeAdapter.from_pretrained(
        base=config.base, generator=config.generator, dtype=dtypes[config.dtype], device=config.device
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


class Store:
    """Append-only JSONL of finished work, keyed by method + item id (items) or group id (contexts)."""

    def __init__(self, out: Path):
        self.path = out / "records.jsonl"
        self.items: dict[tuple[str, str], dict] = {}
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
            self.items[(record["method"], record["id"])] = record
        elif record.get("kind") == "context":
            self.contexts[(record["method"], record["group"])] = record

    def done(self, method: str, group: Group) -> bool:
        return (method, group.context.id) in self.contexts and all(
            (method, item.id) in self.items for item in group.items
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

    def select_templates(self, method: Method, dev_groups: list[Group], forced: dict[str, Template]) -> dict:
        """Each slot's template for `method`: forced, cached from an earlier run, or best on dev."""
        slots = self.scenario.slots
        cached = self.templates.get(method.name)
        by_name = {slot: {t.name: t for t in cands} for slot, cands in slots.items()}
        if cached and all(cached.get(s, {}).get("chosen") in by_name[s] for s in slots):
            if all(forced[s].name == cached[s]["chosen"] for s in forced):
                return {s: by_name[s][cached[s]["chosen"]] for s in slots}
        record: dict[str, dict] = {}
        to_pick = [s for s in slots if s not in forced]
        for slot in forced:
            record[slot] = {"chosen": forced[slot].name, "how": "forced by --template"}
        dev_items = sum(len(g.items) for g in dev_groups)
        if to_pick and dev_items:
            scores = self._dev_scores(method, dev_groups, to_pick)
            for slot in to_pick:
                means = {name: sum(v) / len(v) for name, v in scores[slot].items()}
                best = max(means.values())
                chosen = next(t.name for t in slots[slot] if means[t.name] == best)  # ties: training format
                record[slot] = {
                    "chosen": chosen,
                    "how": f"best mean {self.scenario.dev_metric[slot]} on the dev split",
                    "dev_scores": means,
                    "dev_items": dev_items,
                }
        for slot in to_pick:
            record.setdefault(slot, {"chosen": slots[slot][0].name, "how": "default (no dev items)"})
        self.templates[method.name] = record
        self.templates_path.write_text(json.dumps(self.templates, indent=2) + "\n")
        return {s: by_name[s][record[s]["chosen"]] for s in slots}

    def _dev_scores(self, method: Method, groups: list[Group], slots: list[str]) -> dict[str, dict[str, list]]:
        candidates = self.scenario.slots
        rounds = max(len(candidates[s]) for s in slots)
        scores: dict[str, dict[str, list]] = {s: {t.name: [] for t in candidates[s]} for s in slots}
        bar = tqdm(groups, desc=f"{self.scenario.name} {method.name} dev", disable=self._quiet(), leave=False)
        for group in bar:
            adapted = method.adapt(group.context)
            try:
                for j in range(rounds):
                    # round j tries candidate j of every slot (slots are evaluated independently)
                    templates = {s: candidates[s][min(j, len(candidates[s]) - 1)] for s in candidates}
                    results = self.scenario.evaluate(method, [(adapted, item) for item in group.items], templates)
                    for slot in slots:
                        if j < len(candidates[slot]):
                            metric = self.scenario.dev_metric[slot]
                            scores[slot][candidates[slot][j].name] += [
                                r[metric] for r in results if r.get(metric) is not None
                            ]
            finally:
                method.release(adapted)
        for slot in slots:  # a template with no dev values (e.g. no items of that kind) scores 0
            for name, values in scores[slot].items():
                if not values:
                    scores[slot][name] = [0.0]
        return scores

    def _quiet(self) -> bool | None:
        return None if self.progress is None else not self.progress

    # ---- evaluation ---------------------------------------------------------------------------

    def run(
        self,
        method: Method,
        groups: list[Group],
        templates: dict[str, Template],
        block: int = 8,
        block_key: Callable[[Group], Any] | None = None,
    ) -> None:
        """Evaluate every group not finished yet. The contexts of one block (up to `block`, all with the
        same `block_key`, e.g. the same length bin, so latencies stay comparable) are answered together."""
        pending = [g for g in groups if not self.store.done(method.name, g)]
        self.skipped[method.name] = len(groups) - len(pending)
        if not pending:
            return
        step = 1 if method.one_context_at_a_time else max(1, block)
        blocks: list[list[Group]] = []
        by_key: dict[Any, list[Group]] = {}
        for group in pending:
            by_key.setdefault(block_key(group) if block_key else None, []).append(group)
        for same in by_key.values():
            blocks += [same[i : i + step] for i in range(0, len(same), step)]
        bar = tqdm(total=len(pending), desc=f"{self.scenario.name} {method.name}", unit="ctx", disable=self._quiet())
        for batch in blocks:
            self.store.add(self._block(method, batch, templates))
            bar.update(len(batch))
        bar.close()

    def _block(self, method: Method, groups: list[Group], templates: dict[str, Template]) -> list[dict]:
        adapted: list[Adapted] = []
        adapt_meters: list[Meter] = []
        try:
            for group in groups:
                with Meter() as meter:
                    adapted.append(method.adapt(group.context))
                adapt_meters.append(meter)
            rows = [(a, item) for a, g in zip(adapted, groups, strict=True) for item in g.items]
            with Meter() as answer:
                results = self.scenario.evaluate(method, rows, templates) if rows else []
        finally:
            for a in adapted:
                method.release(a)
        latency = answer.seconds / max(1, len(rows))
        records, cursor = [], 0
        template_names = {s: t.name for s, t in templates.items()}
        for group, a, meter in zip(groups, adapted, adapt_meters, strict=True):
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
                        "templates": template_names,
                        "latency_s": latency,
                    }
                )
            cursor += n
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

    def item_records(self, method: str, groups: list[Group]) -> list[dict]:
        return [self.store.items[(method, i.id)] for g in groups for i in g.items if (method, i.id) in self.store.items]

    def context_records(self, method: str, groups: list[Group]) -> list[dict]:
        return [
            self.store.contexts[(method, g.context.id)] for g in groups if (method, g.context.id) in self.store.contexts
        ]


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
    }
    values.update(extra)
    return values


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def config_dict(config: CommonConfig, data: Path, ga, window: int, limit: int, dev: int) -> dict:
    """The run's settings as recorded in the JSON."""
    return {
        "data": str(data),
        "methods": list(config.methods),
        "limit": limit,
        "dev": dev,
        "seed": config.seed,
        "template": config.template,
        "batch_size": config.batch_size,
        "window": window,
        "share_prefix": config.share_prefix,
        "sft": config.sft.to_dict(),
        "device": config.device,
        "dtype": config.dtype,
        "threads": config.threads,
        "base": config.base,
        "base_name": ga.base_name,
        "generator": str(config.generator) if config.generator else None,
        "generator_fingerprint": ga.fingerprint,
        "generator_config": ga.config.to_dict(),
        "out": str(config.out) if config.out else None,
    }
