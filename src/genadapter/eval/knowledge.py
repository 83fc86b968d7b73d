"""Scenario 1 — knowledge from documents: answer questions about a context (SQuAD-style F1 / EM).

Input: any JSONL with `context`, `question`, `answers` (a list, or one string), and optionally `split` ("dev" or
"test": the file fixes the dev split) and `length` (a nominal context length to report by, instead of quartile
bins of the measured lengths). Each distinct context is one adaptation; all its questions are asked after it.
With `group_tokens` (e.g. TweetQA as a news stream) many short contexts are packed, in a seeded random order, into
contexts of ≈N tokens each, and every question about a packed document is asked of the whole pack; one run can
hold several N.

Split: items of `dev` distinct contexts (fixed seed, independent of --seed) pick each method's template
and are never reported; the rest is the test set, shuffled with --seed, of which --limit items are used
(per context length when grouping: whole packs in order, the last one cut at the limit). --skip N leaves out the
first N and every other question on their contexts: a sample disjoint from an earlier run's --limit N.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import GenAdapterError
from ..metrics import contains_answer, exact_match, named_options, token_f1
from . import templates as T
from .engine import Engine
from .methods import Adapted, EvalContext, Method, make_methods
from .report import (
    cost_by_length,
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
    select_test_items,
    template_key,
    template_views,
)

DEFAULT_LIMIT = 100
DEFAULT_DEV = 32  # dev contexts, one question each: enough to tell templates apart by more than noise
DEV_SEED = 1234  # the dev/test split never moves with --seed
LENGTH_BINS = 4


def default_data() -> Path:
    from ..data import data_root

    return data_root() / "knowledge" / "squad_v1_sample.jsonl"


@dataclass
class KnowledgeConfig(CommonConfig):
    group_tokens: list[int] = field(default_factory=list)  # empty: every context on its own
    max_new_tokens: int = 20


@dataclass
class QAItem:
    id: str
    question: str
    answers: list[str]
    context: str
    split: str | None = None  # "dev" / "test" when the file fixes the split
    length: int | None = None  # nominal context length, when the file gives one


def load_qa(path: Path) -> list[QAItem]:
    if not path.is_file():
        raise GenAdapterError(f"{path} does not exist")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answers = row["answers"]
            answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
            split, length = row.get("split"), row.get("length")
            item = QAItem(
                str(len(items)), str(row["question"]), answers, str(row["context"]), split, length and int(length)
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GenAdapterError(f"{path}:{number}: expected JSON with context, question, answers ({exc})") from exc
        if split not in (None, "dev", "test"):
            raise GenAdapterError(f"{path}:{number}: split must be 'dev' or 'test', got {split!r}")
        if item.question.strip() and item.context.strip() and answers:
            items.append(item)
    if not items:
        raise GenAdapterError(f"{path} holds no usable items")
    return items


def context_id(text: str) -> str:
    return "c" + hashlib.sha1(text.encode()).hexdigest()[:12]


def split_dev(items: list[QAItem], dev: int) -> tuple[list[QAItem], list[QAItem]]:
    """(dev items: one question each of `dev` contexts, test items: those of all other contexts). When the file fixes
    the split, dev contexts come from its dev items only, and its other dev items are not used at all."""
    order = list(items)
    if any(item.split for item in items):
        pinned = [i for i in order if i.split == "dev"]
        dev_items, _ = split_dev([replace(i, split=None) for i in pinned], dev)
        return dev_items, [i for i in items if i.split != "dev"]
    random.Random(DEV_SEED).shuffle(order)
    dev_items, dev_contexts = [], set()
    for item in order:
        if len(dev_items) >= dev:
            break
        if item.context not in dev_contexts:
            dev_contexts.add(item.context)
            dev_items.append(item)
    return dev_items, [i for i in items if i.context not in dev_contexts]


def single_groups(items: list[QAItem], engine: Engine, prefix: str = "") -> list[Group]:
    groups: dict[str, Group] = {}
    for item in items:
        cid = prefix + context_id(item.context)
        if cid not in groups:
            tokens = engine.count(item.context)
            info = {"context_tokens": tokens, "length": tokens}
            if item.length is not None:
                info["nominal_length"] = item.length
            groups[cid] = Group(EvalContext(cid, [item.context]), [], info)
        groups[cid].items.append(item)
    return list(groups.values())


def packed_groups(items: list[QAItem], engine: Engine, size: int, seed: int, limit: int) -> list[Group]:
    """Contexts of ≈`size` tokens packed from many short ones; each question goes with its pack."""
    by_context: dict[str, list[QAItem]] = {}
    for item in items:
        by_context.setdefault(item.context, []).append(item)
    texts = list(by_context)
    random.Random(seed).shuffle(texts)
    packs: list[list[str]] = [[]]
    used = 0
    for text in texts:
        n = engine.count(text) + 2  # + the separator (and a token or two of boundary effects)
        if packs[-1] and used + n > size:
            packs.append([])
            used = 0
        packs[-1].append(text)
        used += n
    groups, total = [], 0
    for j, pack in enumerate(packs):
        if limit and total >= limit:
            break
        questions = [
            QAItem(f"n{size}:{i.id}", i.question, i.answers, i.context) for text in pack for i in by_context[text]
        ]
        if limit:
            questions = questions[: limit - total]
        total += len(questions)
        context = EvalContext(f"n{size}:g{j}", pack)
        info = {"group_tokens": size, "context_tokens": engine.count(context.text), "length": size}
        groups.append(Group(context, questions, info))
    return groups


def length_bin_edges(lengths: list[int], bins: int = LENGTH_BINS) -> list[int]:
    values = sorted(lengths)
    if not values:
        return []
    edges = sorted({values[min(len(values) - 1, (len(values) * q) // bins)] for q in range(1, bins)})
    return [e for e in edges if e < values[-1]] + [values[-1]]


class KnowledgeScenario(Scenario):
    name = "knowledge"
    slots = {"qa": T.KNOWLEDGE}
    dev_metric = {"qa": "contains"}

    def evaluate(self, method: Method, rows: list[tuple[Adapted, QAItem]], templates: dict) -> list[dict]:
        template = templates["qa"]
        out = method.generate([(a, template, item.question) for a, item in rows], self.max_new_tokens)
        options = [named_options(item.question, item.answers) for _, item in rows]
        scored = self.score_options(
            method,
            [
                (a, template, item.question, named[0]) if named else None
                for (a, item), named in zip(rows, options, strict=True)
            ],
        )
        results = []
        for index, ((adapted, item), (answer, prompted)) in enumerate(zip(rows, out, strict=True)):
            option_acc = None
            if scored[index] is not None:
                values = [value for value, _ in scored[index]]
                option_acc = 100.0 * (max(range(len(values)), key=values.__getitem__) == options[index][1])
            results.append(
                {
                    "question": item.question,
                    "answers": item.answers,
                    "prediction": answer,
                    "contains": 100 * contains_answer(answer, item.answers),
                    "f1": 100 * token_f1(answer, item.answers),
                    "em": 100 * exact_match(answer, item.answers),
                    "option_acc": option_acc,
                    **prompt_facts([prompted], method, adapted, self.engine.count(answer) + 1),
                }
            )
        return results


def run_knowledge(config: KnowledgeConfig, ga=None, scenario_name: str = "knowledge") -> dict:
    """Evaluate the methods on a QA file; write records, JSON, markdown and plots; return the result."""
    data = Path(config.data or default_data())
    items = load_qa(data)
    ga = ga or load_adapter(config)
    engine = Engine(ga, batch_size=config.batch_size, share_prefix=config.share_prefix)
    window = config.window or ga.model.config.get_text_config().max_position_embeddings
    limit = DEFAULT_LIMIT if config.limit is None else config.limit
    dev = DEFAULT_DEV if config.dev is None else config.dev
    sizes = sorted(set(config.group_tokens))
    if any(s < 1 for s in sizes):
        raise GenAdapterError("--group-tokens sizes must be positive")

    dev_items, test_items = split_dev(items, dev)
    dev_groups = single_groups(dev_items, engine, prefix="dev:")
    random.Random(config.seed).shuffle(test_items)
    if sizes:
        if config.skip:
            raise GenAdapterError("--skip selects single contexts; it cannot be combined with --group-tokens")
        groups = [g for size in sizes for g in packed_groups(test_items, engine, size, config.seed, limit)]
    else:
        chosen = select_test_items(test_items, config.skip, limit, context_of=lambda item: item.context)
        groups = single_groups(chosen, engine)

    scenario = KnowledgeScenario(engine, config.max_new_tokens)
    out = Path(config.out or "out/eval/knowledge")
    fingerprint = fingerprint_of(
        scenario_name, ga, config, data, max_new_tokens=config.max_new_tokens, window_tokens=window
    )
    runner = Runner(scenario, config, out, fingerprint, progress=config.progress)
    methods = make_methods(config.methods, engine, window, config.sft)
    forced = T.parse_forced(config.template, scenario.slots)
    nominal = not sizes and all("nominal_length" in g.info for g in groups)
    edges = [] if sizes or nominal else length_bin_edges([g.info["context_tokens"] for g in groups])

    def length_of(record: dict) -> int:
        if sizes:
            return record["group_tokens"]
        if nominal:
            return record["nominal_length"]
        return next(e for e in edges if record["context_tokens"] <= e)

    plan = run_methods(
        runner, methods, lambda _: groups, dev_groups, forced, config.all_templates, config.batch_size,
        block_key=lambda g: length_of(g.info),
    )  # fmt: skip
    sensitivity, template_section = template_views(runner, methods, lambda _: groups, plan)

    metrics, by_length, costs, costs_by_length, all_items, all_contexts = {}, {}, {}, {}, [], []
    for method in methods:
        records = runner.item_records(method.name, groups, plan.shared)
        contexts = runner.context_records(method.name, groups)
        all_items += records
        all_contexts += contexts
        option_items = [r["option_acc"] for r in records if r.get("option_acc") is not None]
        metrics[method.name] = {
            "contains": mean([r.get("contains") for r in records]),
            "f1": mean([r["f1"] for r in records]),
            "em": mean([r["em"] for r in records]),
            "option_acc": mean(option_items),
            "option_n": len(option_items),
            "n": len(records),
            "truncated": sum(1 for r in records if r.get("truncated")),
        }
        buckets: dict[int, list[dict]] = {}
        for r in records:
            buckets.setdefault(length_of(r), []).append(r)
        by_length[method.name] = [
            {
                "length": length,
                "contains": mean([r.get("contains") for r in rs]),
                "f1": mean([r["f1"] for r in rs]),
                "em": mean([r["em"] for r in rs]),
                "n": len(rs),
                "truncated": sum(1 for r in rs if r.get("truncated")),
            }
            for length, rs in sorted(buckets.items())
        ]
        costs[method.name] = cost_summary(contexts, records)
        costs_by_length[method.name] = cost_by_length(
            [{**c, "length": length_of(c)} for c in contexts] if not sizes else contexts
        )

    if sizes:
        length_note = "length = tokens per packed context (--group-tokens)"
    elif nominal:
        length_note = "length = the nominal context length the data file gives (its `length` field)"
    else:
        length_note = f"length = upper edge of a context-token bin (quartiles of the test contexts: {edges})"
    result = {
        "scenario": scenario_name,
        "headline_metric": "contains",
        "metrics": metrics,
        "by_length": by_length,
        "templates": runner.templates,
        "template_sensitivity": sensitivity,
        "costs": costs,
        "costs_by_length": costs_by_length,
        "config": {
            **config_dict(config, data, ga, window, limit, dev),
            "group_tokens": sizes,
            "max_new_tokens": config.max_new_tokens,
            "test_items": sum(len(g.items) for g in groups),
            "test_contexts": len(groups),
            "dev_items": len(dev_items),
        },
        "resume": {"skipped_contexts": runner.skipped},
        "notes": [
            length_note,
            "contains (the headline): % of answers holding a gold answer (SQuAD-normalised tokens, contiguous); "
            "f1/em: SQuAD-normalised, in percent; option_acc: % of the option_n questions naming their options "
            "('A or B', gold on one side) where the gold option is the likelier; dev items are never reported",
        ],
        "items": all_items,
        "contexts": all_contexts,
        "versions": versions(),
        "machine": machine(config.device),
    }
    length_rows = [
        [m, row["length"], fmt(row["contains"]), fmt(row["f1"]), fmt(row["em"]), row["n"], row["truncated"]]
        for m, rows in by_length.items()
        for row in rows
    ]
    sections = [
        ("Results", main_table(metrics, costs, ["contains", "f1", "em", "option_acc", "option_n"], plan.shared)),
        (
            "By context length",
            length_note
            + "\n\n"
            + markdown_table(["method", "length", "contains", "f1", "em", "n", "truncated"], length_rows),
        ),
        ("Templates", template_section),
    ]
    plots = [
        (
            "contains_vs_length.png",
            lambda p: line_plot(
                p,
                {m: [(r["length"], r["contains"]) for r in rows] for m, rows in by_length.items()},
                f"knowledge QA, template {template_key(plan.shared)}",
                "context tokens",
                "answers containing the gold answer (%)",
            ),
        ),
        ("cost_vs_length.png", lambda p: cost_plot(p, costs_by_length)),
        ("templates.png", lambda p: template_plot(p, sensitivity, "contains")),
    ]
    return write_results(out, config.json, result, sections, plots, config.plots)
