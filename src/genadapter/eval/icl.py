"""Scenario 2 — learning from demonstrations: MetaICL held-out tasks with k demonstrations.

The context is k demonstrations (`formats.demonstrations`, the first k of `<task>_16_<seed>_train.jsonl`),
the query is `formats.icl_query(input)`. With options, the answer is the option of highest summed
log-probability (continuation " " + option); without, a greedy answer scored by exact match. Accuracy is
averaged over the items of a (task, seed, k), then over seeds, then over tasks.

k = 0 has no context: every method is then the base model with its own template, so k = 0 is evaluated
once per task (not per seed). `closed-book` ignores demonstrations, so it runs only at k = 0 and its
accuracy is reported for every k.

Input: the MetaICL `test_tasks` directory (one folder per task), or any MetaICL-format JSONL file
(`task`, `input`, `output`, `options`). For a file, demonstrations and dev queries come from its sibling
`<task>_16_<seed>_{train,dev}.jsonl` files when they exist, else from a fixed pool of its own lines that
is kept out of the test items.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from .. import formats
from ..errors import GenAdapterError
from ..metrics import exact_match
from . import templates as T
from .engine import Engine
from .methods import Adapted, EvalContext, Method, make_methods
from .report import (
    bar_plot,
    cost_plot,
    cost_summary,
    fmt,
    line_plot,
    machine,
    main_table,
    markdown_table,
    template_plot,
    versions,
    write_results,
)
from .runner import (
    CommonConfig,
    Group,
    Runner,
    Scenario,
    config_dict,
    fingerprint_of,
    load_adapter,
    mean,
    prompt_facts,
    run_methods,
    template_views,
)

SEEDS = (13, 21, 42, 87, 100)
SHOTS = (0, 4, 16)
# A fixed, documented subset that keeps the default run short: 4 multiple-choice + 4 classification tasks.
DEFAULT_TASKS = (
    "ai2_arc",
    "codah",
    "commonsense_qa",
    "superglue-copa",
    "glue-rte",
    "poem_sentiment",
    "sick",
    "hate_speech18",
)
DEFAULT_LIMIT = 8  # test queries per task
DEFAULT_DEV = 32  # dev queries in all (over up to 4 tasks, first seed, smallest k > 0)
DEV_TASKS = 4
POOL_SEED = 1234


def default_data() -> Path:
    from ..data import data_root

    return data_root() / "metaicl" / "test_tasks"


@dataclass
class ICLConfig(CommonConfig):
    tasks: list[str] | None = None  # None: DEFAULT_TASKS (those present); ["all"]: every task found
    shots: list[int] = field(default_factory=lambda: list(SHOTS))
    seeds: list[int] = field(default_factory=lambda: list(SEEDS))
    max_new_tokens: int = 20  # for tasks without options


@dataclass
class ICLItem:
    id: str
    input: str
    output: str
    options: list[str]


@dataclass
class Task:
    name: str
    test: list[dict]
    train: dict[int, list[dict]]  # seed -> demonstration pool (16)
    dev: dict[int, list[dict]]  # seed -> dev queries


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append(
                    {
                        "task": str(row.get("task", "")),
                        "input": str(row["input"]),
                        "output": str(row["output"]),
                        "options": [str(o) for o in row.get("options") or []],
                    }
                )
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise GenAdapterError(f"{path}:{number}: not a MetaICL line (task, input, output, options)") from exc
    return rows


def _siblings(folder: Path, task: str, seeds: list[int], kind: str) -> dict[int, list[dict]]:
    found = {}
    for seed in seeds:
        path = folder / f"{task}_16_{seed}_{kind}.jsonl"
        if path.is_file():
            found[seed] = _read_jsonl(path)
    return found


def _task(name: str, rows: list[dict], folder: Path, seeds: list[int]) -> Task:
    train, dev = _siblings(folder, name, seeds, "train"), _siblings(folder, name, seeds, "dev")
    if len(train) == len(seeds) and len(dev) == len(seeds):
        return Task(name, rows, train, dev)
    # no demonstration files: a fixed pool of the file's own lines gives demonstrations and dev queries
    rows = list(rows)
    random.Random(POOL_SEED).shuffle(rows)
    pool_size = min(32, len(rows) // 3)
    if pool_size < 2:
        raise GenAdapterError(f"task {name}: too few lines to draw demonstrations from (and no *_train.jsonl)")
    pool, test = rows[:pool_size], rows[pool_size:]
    dev_pool, demo_pool = pool[: pool_size // 4 or 1], pool[pool_size // 4 or 1 :]
    train = {s: random.Random(s).sample(demo_pool, min(16, len(demo_pool))) for s in seeds}
    return Task(name, test, train, {s: dev_pool for s in seeds})


def load_tasks(data: Path, names: list[str] | None, seeds: list[int]) -> list[Task]:
    if data.is_dir():
        available = sorted(p.name for p in data.iterdir() if (p / "test.jsonl").is_file())
        if not available:
            raise GenAdapterError(f"{data} holds no MetaICL task folders (<task>/test.jsonl)")
        if names is None:
            chosen = [t for t in DEFAULT_TASKS if t in available] or available
        elif names == ["all"]:
            chosen = available
        else:
            missing = [n for n in names if n not in available]
            if missing:
                raise GenAdapterError(f"tasks not found in {data}: {', '.join(missing)}")
            chosen = names
        return [_task(n, _read_jsonl(data / n / "test.jsonl"), data / n, seeds) for n in chosen]
    if not data.is_file():
        raise GenAdapterError(f"{data} does not exist")
    rows = _read_jsonl(data)
    if not rows:
        raise GenAdapterError(f"{data} is empty")
    default_name = data.parent.name if data.name == "test.jsonl" else data.stem
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"] or default_name, []).append(row)
    if names and names != ["all"]:
        by_task = {k: v for k, v in by_task.items() if k in names}
        if not by_task:
            raise GenAdapterError(f"none of the tasks {names} is in {data}")
    return [_task(name, task_rows, data.parent, seeds) for name, task_rows in by_task.items()]


def _items(prefix: str, rows: list[dict]) -> list[ICLItem]:
    return [ICLItem(f"{prefix}:{j}", r["input"], r["output"], r["options"]) for j, r in enumerate(rows)]


class ICLScenario(Scenario):
    name = "icl"
    slots = {"icl": T.ICL}
    dev_metric = {"icl": "accuracy"}

    def evaluate(self, method: Method, rows: list[tuple[Adapted, ICLItem]], templates: dict) -> list[dict]:
        template = templates["icl"]
        by_item = self.score_options(
            method, [(adapted, template, item.input, item.options) if item.options else None for adapted, item in rows]
        )
        generate_idx = [i for i, (_, item) in enumerate(rows) if not item.options]
        generated = method.generate(
            [(rows[i][0], template, rows[i][1].input) for i in generate_idx], self.max_new_tokens
        )
        answers = dict(zip(generate_idx, generated, strict=True))
        results = []
        for index, (adapted, item) in enumerate(rows):
            if item.options:
                values = by_item[index]
                best = max(range(len(values)), key=lambda j: values[j][0])
                prediction = item.options[best]
                correct = prediction.strip() == item.output.strip()
                facts = prompt_facts(
                    [p for _, p in values], method, adapted, sum(self.engine.count(" " + o) for o in item.options)
                )
                extra = {"option_scores": [round(v, 4) for v, _ in values]}
            else:
                prediction, prompted = answers[index]
                correct = bool(exact_match(prediction, [item.output]))
                facts = prompt_facts([prompted], method, adapted, self.engine.count(prediction) + 1)
                extra = {}
            results.append(
                {"prediction": prediction, "gold": item.output, "accuracy": 100.0 * correct, **extra, **facts}
            )
        return results


def run_icl(config: ICLConfig, ga=None) -> dict:
    data = Path(config.data or default_data())
    seeds = list(dict.fromkeys(config.seeds))
    shots = sorted(set(config.shots))
    if not seeds or not shots or any(k < 0 for k in shots):
        raise GenAdapterError("--seeds and --shots need at least one value each; shots must be >= 0")
    if config.skip:
        raise GenAdapterError("--skip is for knowledge and persona; icl draws a fresh sample with another --seed")
    tasks = load_tasks(data, config.tasks, seeds)
    ga = ga or load_adapter(config)
    engine = Engine(ga, batch_size=config.batch_size, share_prefix=config.share_prefix)
    window = config.window or ga.model.config.get_text_config().max_position_embeddings
    limit = DEFAULT_LIMIT if config.limit is None else config.limit
    dev = DEFAULT_DEV if config.dev is None else config.dev

    def context(cid: str, demos: list[dict]) -> EvalContext:
        return EvalContext(cid, [formats.demonstrations([(d["input"], d["output"]) for d in demos])] if demos else [])

    groups: list[Group] = []
    for task in tasks:
        rng = random.Random(f"{config.seed}:{task.name}")
        queries = rng.sample(task.test, min(limit, len(task.test))) if limit else list(task.test)
        for k in shots:
            for seed in [None] if k == 0 else seeds:
                cid = f"{task.name}:k0" if k == 0 else f"{task.name}:s{seed}:k{k}"
                demos = task.train[seed][:k] if k else []
                ctx = context(cid, demos)
                info = {"task": task.name, "seed": seed, "k": k, "context_tokens": engine.count(ctx.text)}
                groups.append(Group(ctx, _items(cid, queries), info))

    dev_groups: list[Group] = []
    dev_k = min([k for k in shots if k > 0], default=0)
    dev_tasks = tasks[: min(DEV_TASKS, len(tasks))]
    per_task = math.ceil(dev / len(dev_tasks)) if dev and dev_tasks else 0
    for task in dev_tasks if per_task else []:
        seed = seeds[0]
        cid = f"dev:{task.name}:s{seed}:k{dev_k}"
        demos = task.train[seed][:dev_k]
        dev_groups.append(Group(context(cid, demos), _items(cid, task.dev[seed][:per_task]), {"task": task.name}))

    scenario = ICLScenario(engine, config.max_new_tokens)
    out = Path(config.out or "out/eval/icl")
    fingerprint = fingerprint_of("icl", ga, config, data, max_new_tokens=config.max_new_tokens, window_tokens=window)
    runner = Runner(scenario, config, out, fingerprint, progress=config.progress)
    methods = make_methods(config.methods, engine, window, config.sft)
    forced = T.parse_forced(config.template, scenario.slots)

    def groups_for(method: Method) -> list[Group]:
        return [g for g in groups if g.info["k"] == 0] if method.name == "closed-book" else groups

    plan = run_methods(
        runner, methods, groups_for, dev_groups, forced, config.all_templates, config.batch_size,
        block_key=lambda g: g.info["k"],
    )  # fmt: skip
    sensitivity, template_section = template_views(runner, methods, groups_for, plan)

    demo_tokens = {k: mean([g.info["context_tokens"] for g in groups if g.info["k"] == k]) or 0 for k in shots}
    metrics, per_task, costs, costs_by_k, all_items, all_contexts = {}, {}, {}, {}, [], []
    for method in methods:
        records = runner.item_records(method.name, groups_for(method), plan.shared)
        contexts = runner.context_records(method.name, groups_for(method))
        all_items += records
        all_contexts += contexts
        acc: dict[str, dict[int, dict]] = {}  # task -> k -> seed -> [values]
        for r in records:
            acc.setdefault(r["task"], {}).setdefault(r["k"], {}).setdefault(r["seed"], []).append(r["accuracy"])
        table: dict[str, dict[str, float | None]] = {}
        for task in tasks:
            by_k = acc.get(task.name, {})
            row = {}
            for k in shots:
                source = by_k.get(0 if method.name == "closed-book" else k, {})
                row[f"k={k}"] = mean([mean(v) for v in source.values()])
            table[task.name] = row
        per_task[method.name] = table
        values = {"n": len(records)}
        for k in shots:
            task_means = [row[f"k={k}"] for row in table.values() if row[f"k={k}"] is not None]
            values[f"accuracy_k{k}"] = mean(task_means)
            if k > 0 and method.name != "closed-book":
                seed_means = []
                for seed in seeds:
                    seed_means.append(mean([mean(acc.get(t.name, {}).get(k, {}).get(seed, [])) for t in tasks]))
                seed_means = [s for s in seed_means if s is not None]
                if len(seed_means) > 1:
                    m = mean(seed_means)
                    values[f"accuracy_k{k}_seed_std"] = (sum((s - m) ** 2 for s in seed_means) / len(seed_means)) ** 0.5
        values["accuracy"] = values[f"accuracy_k{max(shots)}"]
        values["truncated"] = sum(1 for r in records if r.get("truncated"))
        metrics[method.name] = values
        costs[method.name] = cost_summary(contexts, records)
        rows = []
        for k in shots:
            ks = [c for c in contexts if c["k"] == (0 if method.name == "closed-book" else k)]
            if ks:
                rows.append(
                    {
                        "k": k,
                        "length": demo_tokens[k],
                        "contexts": len(ks),
                        "adapt_s": mean([c["adapt_s"] for c in ks]),
                        "latency_s": mean([c["latency_s"] for c in ks]),
                        "kept_bytes": mean([c["kept_bytes"] for c in ks]),
                        "adapt_peak_mib": max(c["adapt_peak_mib"] for c in ks),
                    }
                )
        costs_by_k[method.name] = rows

    notes = [
        f"accuracy = accuracy at k={max(shots)}; accuracy_k<K>: mean over tasks of the mean over seeds, in percent",
        "k=0 is evaluated once per task; closed-book runs only at k=0 and is reported for every k",
        "dev queries (the first seed's *_dev.jsonl of the first tasks) are never reported",
        "Templates section: accuracy over all of a method's test items (every k it ran)",
    ]
    result = {
        "scenario": "icl",
        "metrics": metrics,
        "per_task": per_task,
        "templates": runner.templates,
        "template_sensitivity": sensitivity,
        "costs": costs,
        "costs_by_k": costs_by_k,
        "config": {
            **config_dict(config, data, ga, window, limit, dev),
            "tasks": [t.name for t in tasks],
            "shots": shots,
            "seeds": seeds,
            "max_new_tokens": config.max_new_tokens,
            "dev_tasks": [t.name for t in dev_tasks] if per_task else [],
            "dev_k": dev_k,
        },
        "resume": {"skipped_contexts": runner.skipped},
        "notes": notes,
        "items": all_items,
        "contexts": all_contexts,
        "versions": versions(),
        "machine": machine(config.device),
    }
    keys = [f"accuracy_k{k}" for k in shots]
    task_rows = [
        [task, *(fmt(per_task[m][task][f"k={k}"]) for k in shots), m] for m in per_task for task in per_task[m]
    ]
    sections = [
        ("Results", main_table(metrics, costs, keys, plan.shared)),
        ("Per task", markdown_table(["task", *(f"k={k}" for k in shots), "method"], task_rows)),
        ("Templates", template_section),
    ]
    plots = [
        (
            "accuracy_vs_k.png",
            lambda p: line_plot(
                p,
                {
                    m: [(k, v[f"accuracy_k{k}"]) for k in shots if v.get(f"accuracy_k{k}") is not None]
                    for m, v in metrics.items()
                },
                "MetaICL held-out tasks",
                "demonstrations k",
                "accuracy (%)",
            ),
        ),
        ("cost_vs_length.png", lambda p: cost_plot(p, costs_by_k, "demonstration tokens (mean per k)")),
        ("accuracy.png", lambda p: bar_plot(p, metrics, keys, "accuracy by k")),
        ("templates.png", lambda p: template_plot(p, sensitivity, "accuracy")),
    ]
    return write_results(out, config.json, result, sections, plots, config.plots)
