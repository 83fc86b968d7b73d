"""Scenario 3 — personalization from chat history (PersonaChat / ConvAI2, ParlAI text format).

The persona lines (`your persona: …`) are hidden; the dialogue turns except the last one are the history
(`formats.dialogue`: the partner's lines and the persona owner's — "the user's" — replies). Two tasks:

(a) persona recall: for each persona sentence of the user, a multiple choice between it and
    `distractors` persona sentences of other users (never of a dialogue that shares an utterance with
    this one), by the summed log-probability of " " + sentence after the recall prompt;
(b) reply: the user's reply to the partner's last message, greedy, token F1 against the gold reply.

Split: `dev` dialogues (fixed seed) pick the templates and are never reported; --limit test dialogues are
drawn from the rest with --seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..errors import GenAdapterError
from ..metrics import normalize_answer, token_f1
from . import templates as T
from .engine import Engine
from .knowledge import length_bin_edges
from .methods import Adapted, EvalContext, Method, make_methods
from .report import (
    bar_plot,
    cost_by_length,
    cost_plot,
    cost_summary,
    machine,
    main_table,
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
    template_views,
)

DEFAULT_LIMIT = 40  # test dialogues
DEFAULT_DEV = 32  # dev dialogues: 32 reply items and ≈ 5 persona-recall items each
DEV_SEED = 1234
_LINE = re.compile(r"^(\d+) (.*)$")


def default_data() -> Path:
    from ..data import data_root

    return data_root() / "persona" / "personachat_valid_700.txt"


@dataclass
class PersonaConfig(CommonConfig):
    distractors: int = 4
    max_new_tokens: int = 32


@dataclass
class Dialogue:
    id: str
    persona: list[str]
    turns: list[tuple[str, str]]


@dataclass
class RecallItem:
    id: str
    fact: str
    candidates: list[str]
    answer: int


@dataclass
class ReplyItem:
    id: str
    message: str
    gold: str


def parse_personachat(path: Path) -> list[Dialogue]:
    """Dialogues of a ParlAI-format file: a line numbered 1 starts one; persona lines, then turns."""
    if not path.is_file():
        raise GenAdapterError(f"{path} does not exist")
    dialogues: list[Dialogue] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        match = _LINE.match(raw)
        if match is None:
            raise GenAdapterError(f"{path}:{number}: expected '<n> <text>' (ParlAI format)")
        index, text = int(match.group(1)), match.group(2)
        if index == 1 or not dialogues:
            dialogues.append(Dialogue(f"d{len(dialogues)}", [], []))
        dialogue = dialogues[-1]
        if text.startswith("your persona:"):
            dialogue.persona.append(text[len("your persona:") :].strip())
        elif text.startswith("partner's persona:"):
            continue
        else:
            parts = text.split("\t")
            dialogue.turns.append((parts[0].strip(), parts[1].strip() if len(parts) > 1 else ""))
    usable = [d for d in dialogues if d.persona and len(d.turns) >= 2 and d.turns[-1][1]]
    if not usable:
        raise GenAdapterError(f"{path} holds no dialogues with persona lines and at least two turns")
    return usable


def build_groups(
    dialogues: list[Dialogue], everyone: list[Dialogue], engine: Engine, distractors: int, seed: int, prefix: str = ""
) -> list[Group]:
    utterances: dict[str, set[str]] = {}
    for d in everyone:
        for partner, user in d.turns:
            for u in (partner, user):
                if u:
                    utterances.setdefault(u, set()).add(d.id)
    groups = []
    for d in dialogues:
        related = {other for p, u in d.turns for x in (p, u) if x for other in utterances.get(x, ())}
        own = {normalize_answer(f) for f in d.persona}
        pool = sorted(
            {
                f
                for other in everyone
                if other.id not in related
                for f in other.persona
                if normalize_answer(f) not in own
            }
        )
        items: list = []
        for j, fact in enumerate(d.persona):
            rng = random.Random(f"{seed}:{d.id}:{j}")
            candidates = rng.sample(pool, min(distractors, len(pool))) + [fact]
            rng.shuffle(candidates)
            items.append(RecallItem(f"{prefix}{d.id}:recall:{j}", fact, candidates, candidates.index(fact)))
        message, gold = d.turns[-1]
        items.append(ReplyItem(f"{prefix}{d.id}:reply", message, gold))
        history = formats.dialogue(d.turns[:-1])
        tokens = engine.count(history)
        groups.append(Group(EvalContext(prefix + d.id, [history]), items, {"context_tokens": tokens, "length": tokens}))
    return groups


class PersonaScenario(Scenario):
    name = "persona"
    slots = {"recall": T.RECALL, "reply": T.REPLY}
    dev_metric = {"recall": "recall_acc", "reply": "reply_f1"}

    def evaluate(self, method: Method, rows: list[tuple[Adapted, object]], templates: dict) -> list[dict]:
        recall_t, reply_t = templates["recall"], templates["reply"]
        scored = self.score_options(
            method,
            [(a, recall_t, "", item.candidates) if isinstance(item, RecallItem) else None for a, item in rows],
        )
        reply_idx = [i for i, (_, item) in enumerate(rows) if isinstance(item, ReplyItem)]
        replies = method.generate([(rows[i][0], reply_t, rows[i][1].message) for i in reply_idx], self.max_new_tokens)
        generated = dict(zip(reply_idx, replies, strict=True))
        results = []
        for index, (adapted, item) in enumerate(rows):
            if isinstance(item, RecallItem):
                values = scored[index]
                best = max(range(len(values)), key=lambda j: values[j][0])
                tokens = sum(self.engine.count(" " + c) for c in item.candidates)
                results.append(
                    {
                        "task": "recall",
                        "fact": item.fact,
                        "prediction": item.candidates[best],
                        "candidates": item.candidates,
                        "recall_acc": 100.0 * (best == item.answer),
                        **prompt_facts([p for _, p in values], method, adapted, tokens),
                    }
                )
            else:
                reply, prompted = generated[index]
                results.append(
                    {
                        "task": "reply",
                        "message": item.message,
                        "gold": item.gold,
                        "prediction": reply,
                        "reply_f1": 100 * token_f1(reply, [item.gold]),
                        **prompt_facts([prompted], method, adapted, self.engine.count(reply) + 1),
                    }
                )
        return results


def run_persona(config: PersonaConfig, ga=None) -> dict:
    data = Path(config.data or default_data())
    dialogues = parse_personachat(data)
    if config.distractors < 1:
        raise GenAdapterError("--distractors must be at least 1")
    ga = ga or load_adapter(config)
    engine = Engine(ga, batch_size=config.batch_size, share_prefix=config.share_prefix)
    window = config.window or ga.model.config.get_text_config().max_position_embeddings
    limit = DEFAULT_LIMIT if config.limit is None else config.limit
    dev = DEFAULT_DEV if config.dev is None else config.dev

    order = list(dialogues)
    random.Random(DEV_SEED).shuffle(order)
    dev_dialogues, rest = order[:dev], order[dev:]
    random.Random(config.seed).shuffle(rest)
    test = select_test_items(rest, config.skip, limit)
    dev_groups = build_groups(dev_dialogues, dialogues, engine, config.distractors, config.seed, prefix="dev:")
    groups = build_groups(test, dialogues, engine, config.distractors, config.seed)

    scenario = PersonaScenario(engine, config.max_new_tokens)
    out = Path(config.out or "out/eval/persona")
    fingerprint = fingerprint_of(
        "persona",
        ga,
        config,
        data,
        max_new_tokens=config.max_new_tokens,
        distractors=config.distractors,
        window_tokens=window,
    )
    runner = Runner(scenario, config, out, fingerprint, progress=config.progress)
    methods = make_methods(config.methods, engine, window, config.sft)
    forced = T.parse_forced(config.template, scenario.slots)
    edges = length_bin_edges([g.info["context_tokens"] for g in groups])

    def length_of(record: dict) -> int:
        return next(e for e in edges if record["context_tokens"] <= e)

    plan = run_methods(
        runner, methods, lambda _: groups, dev_groups, forced, config.all_templates, config.batch_size,
        block_key=lambda g: length_of(g.info),
    )  # fmt: skip
    sensitivity, template_section = template_views(runner, methods, lambda _: groups, plan)

    metrics, costs, costs_by_length, all_items, all_contexts = {}, {}, {}, [], []
    for method in methods:
        records = runner.item_records(method.name, groups, plan.shared)
        contexts = runner.context_records(method.name, groups)
        all_items += records
        all_contexts += contexts
        recall = [r["recall_acc"] for r in records if r["task"] == "recall"]
        reply = [r["reply_f1"] for r in records if r["task"] == "reply"]
        metrics[method.name] = {
            "recall_acc": mean(recall),
            "reply_f1": mean(reply),
            "n": len(reply),
            "recall_items": len(recall),
            "truncated": sum(1 for r in records if r.get("truncated")),
        }
        costs[method.name] = cost_summary(contexts, records)
        costs_by_length[method.name] = cost_by_length([{**c, "length": length_of(c)} for c in contexts])

    result = {
        "scenario": "persona",
        "metrics": metrics,
        "templates": runner.templates,
        "template_sensitivity": sensitivity,
        "costs": costs,
        "costs_by_length": costs_by_length,
        "config": {
            **config_dict(config, data, ga, window, limit, dev),
            "distractors": config.distractors,
            "max_new_tokens": config.max_new_tokens,
            "test_dialogues": len(groups),
            "dev_dialogues": len(dev_groups),
        },
        "resume": {"skipped_contexts": runner.skipped},
        "notes": [
            f"recall_acc: multiple choice among the true persona sentence and {config.distractors} of other users "
            f"(chance {100 / (config.distractors + 1):.0f}%); reply_f1: token F1 of the reply to the last partner "
            "turn; both in percent; n = dialogues",
            "the history is every turn but the last; the persona lines are never shown to any method",
        ],
        "items": all_items,
        "contexts": all_contexts,
        "versions": versions(),
        "machine": machine(config.device),
    }
    sections = [
        ("Results", main_table(metrics, costs, ["recall_acc", "reply_f1"], plan.shared)),
        ("Templates", template_section),
    ]
    plots = [
        ("persona_metrics.png", lambda p: bar_plot(p, metrics, ["recall_acc", "reply_f1"], "personalization")),
        ("templates.png", lambda p: template_plot(p, sensitivity, "recall_acc")),
        ("cost_vs_length.png", lambda p: cost_plot(p, costs_by_length, "history tokens (quartile bins)")),
    ]
    return write_results(out, config.json, result, sections, plots, config.plots)
