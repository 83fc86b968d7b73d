"""Training data: Wikipedia leads + MetaICL *training* tasks (never the test tasks, knowledge/ or persona/)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import numpy as np

from .. import formats
from ..data import HELDOUT_SEED, data_root, split_wiki
from ..errors import GenAdapterError
from .facts import FactRandom, OpenValues, counterfactual_lead, fact_questions


def metaicl_train_tasks() -> dict[str, list[dict]]:
    root = data_root() / "metaicl" / "train_tasks"
    if not root.is_dir():
        raise GenAdapterError(f"MetaICL training tasks not found in {root} (set GENADAPTER_DATA)")
    test = set(json.loads((data_root() / "metaicl" / "hr_to_lr.json").read_text())["test"])
    tasks = {}
    for path in sorted(root.glob("*.jsonl")):
        if path.stem in test:
            raise GenAdapterError(f"refusing to train on MetaICL test task {path.stem}")
        tasks[path.stem] = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    return tasks


class TokenStream:
    """All training documents tokenized and joined by EOS; sequences are random windows of it."""

    def __init__(self, documents: list[str], tokenizer):
        ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        self.tokens = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.tokens)

    def sample(self, rng: np.random.Generator, length: int, count: int) -> list[list[int]]:
        if len(self.tokens) <= length:
            raise GenAdapterError(f"training text has {len(self.tokens)} tokens, fewer than one sequence ({length})")
        starts = rng.integers(0, len(self.tokens) - length, size=count)
        return [self.tokens[s : s + length].tolist() for s in starts]


def pretrain_documents(heldout: int, limit: int = 0) -> list[str]:
    """Training-split Wikipedia leads plus passages of MetaICL training tasks, shuffled (first `limit` if > 0)."""
    train, _ = split_wiki(heldout)
    docs = [f"{title}\n{text}" for title, text in train]
    tasks = metaicl_train_tasks()
    for task in ("xsum", "quail", "quoref", "cosmos_qa", "superglue-record", "sciq"):
        docs += [ex["input"] for ex in tasks.get(task, [])[:500]]
    random.Random(HELDOUT_SEED).shuffle(docs)
    return docs[:limit] if limit else docs


@dataclass
class Example:
    """One instruction example: the context absorbed, then a prompt (without the context) and its answer."""

    context: list[str]
    prompt: str
    answer: str
    task: str


_QUESTION_FIRST = re.compile(r"^\s*question:\s*(?P<q>.*?)\s*(?:\[SEP\])?\s*context:\s*(?P<c>.*)$", re.S)
_CONTEXT_FIRST = re.compile(r"^\s*context:\s*(?P<c>.*?)\s*question:\s*(?P<q>.*)$", re.S)
_TRAILING_QUESTION = re.compile(r"^(?P<c>.*[.!?\"'])\s*(?P<q>[^.!?]*\?)\s*$", re.S)


def _split_passage_question(task: str, text: str) -> tuple[str, str] | None:
    if task == "cosmos_qa" and "[SEP]" in text:
        question, context = text.split("[SEP]", 1)
        return context.strip(), question.strip()
    for pattern in (_QUESTION_FIRST, _CONTEXT_FIRST, _TRAILING_QUESTION):
        match = pattern.match(text)
        if match:
            return match.group("c").strip(), match.group("q").strip()
    return None


PASSAGE_TASKS = ("quoref", "quail", "superglue-record", "sciq", "boolq", "superglue-multirc", "cosmos_qa", "hotpot_qa")
_NUMBER = re.compile(r"\b(1[0-9]{3}|20[0-9]{2}|[0-9][0-9,.]*[0-9]|[0-9])\b")
# A run of capitalised words (names, places, works), allowing lower-case joiners inside: "Bank of England".
_ENTITY = re.compile(r"\b[A-Z][\w'’-]+(?:\s+(?:of|the|de|da|von|van|and|on)?\s*[A-Z][\w'’-]+)*")
_BE = r"(?:is|was|are|were)"
# (sentence pattern, question template, task); SUBJECT stands for the lead's title, group "a" is the answer.
SUBJECT = "SUBJECT"
_WH_TEMPLATES = (
    (rf"^{SUBJECT} {_BE} (?P<a>(?:a|an|the) [^,;.()]+)", "What is {s}?", "wiki-what"),
    (
        rf"^{SUBJECT} {_BE} (?:\w+ )?(?:located|situated|based) in (?P<a>{_ENTITY.pattern})",
        "Where is {s} located?",
        "wiki-where",
    ),
    (rf"^{SUBJECT} .*?\bborn (?:on [^,]+ )?in (?P<a>{_ENTITY.pattern})", "Where was {s} born?", "wiki-where"),
    (
        rf"^{SUBJECT} .*?\b(?:founded|established|built|formed|created) in (?P<a>1[0-9]{{3}}|20[0-9]{{2}})",
        "When was {s} founded?",
        "wiki-when",
    ),
    (
        rf"^{SUBJECT} .*?\b(?:written|directed|designed|founded|created|developed|composed|painted) by "
        rf"(?P<a>{_ENTITY.pattern})",
        "Who created {s}?",
        "wiki-who",
    ),
)


def passage_examples(tasks: dict[str, list[dict]], per_task: int = 600) -> list[Example]:
    """Passage QA of the training tasks, at most `per_task` each so yes/no tasks (boolq) do not dominate."""
    out = []
    for task in PASSAGE_TASKS:
        for ex in tasks.get(task, [])[:per_task]:
            parts = _split_passage_question(task, ex["input"])
            if parts and parts[0] and parts[1] and len(ex["output"].split()) <= 12:
                out.append(Example([parts[0]], formats.qa_prompt(parts[1]), ex["output"], task))
    for ex in tasks.get("xsum", [])[:500]:
        article = ex["input"].removeprefix("summarize:").strip()
        out.append(Example([article], "Summarize the document in one sentence.", ex["output"], "xsum"))
    return out


def _cloze(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """Blank one name or number (names twice as likely: a number-only diet teaches the adapter to answer years)."""
    names = [m for m in _ENTITY.finditer(sentence) if m.start() > 0]
    numbers = list(_NUMBER.finditer(sentence))
    pool = names * 2 + numbers
    if not pool:
        return None
    match = rng.choice(pool)
    return sentence[: match.start()] + "____" + sentence[match.end() :], match.group(0)


def wiki_examples(leads: list[tuple[str, str]], rng: random.Random) -> list[Example]:
    """Questions a lead answers, built without a model: wh-questions from a few reliable sentence patterns
    about the title, cloze questions (a name or number blanked out) and title -> first sentence."""
    out = []
    for title, text in leads:
        sentences = re.split(r"(?<=[.!?])\s+", text)
        if rng.random() < 0.2:
            out.append(Example([text], f"Describe {title} in one sentence.", sentences[0], "wiki-title"))
        subject = re.escape(title)
        for pattern, question, task in _WH_TEMPLATES:
            match = next((m for s in sentences if (m := re.match(pattern.replace(SUBJECT, subject), s))), None)
            if match and len(match.group("a").split()) <= 10:
                out.append(Example([text], formats.qa_prompt(question.format(s=title)), match.group("a").strip(), task))
        candidates = [s for s in sentences if 6 <= len(s.split()) <= 40]
        for sentence in rng.sample(candidates, min(2, len(candidates))):
            cloze = _cloze(sentence, rng)
            if cloze:
                prompt = formats.qa_prompt(f"Fill in the blank: {cloze[0]}")
                out.append(Example([text], prompt, cloze[1], "wiki-cloze"))
    return out


def icl_examples(tasks: dict[str, list[dict]], rng: random.Random, per_task: int = 200) -> list[Example]:
    """k demonstrations as the context, a new query as the prompt (classification tasks with options)."""
    out = []
    for task, rows in tasks.items():
        rows = [r for r in rows if r.get("options") and len(r["input"]) < 600]
        if len(rows) < 20:
            continue
        for _ in range(per_task):
            k = rng.choice((4, 8, 16))
            picked = rng.sample(rows, k + 1)
            demos = formats.demonstrations([(r["input"], r["output"]) for r in picked[:k]])
            out.append(Example([demos], formats.icl_query(picked[k]["input"]), picked[k]["output"], f"icl:{task}"))
    return out


def add_distractors(examples: list[Example], rng: random.Random, probability: float = 0.5) -> None:
    """Mix other passages into some contexts so the generator must store several documents at once."""
    pool = [ex.context[0] for ex in examples if not ex.task.startswith("icl:")]
    for ex in examples:
        if not ex.task.startswith("icl:") and rng.random() < probability:
            ex.context = ex.context + rng.sample(pool, rng.choice((1, 2)))
            rng.shuffle(ex.context)


def counterfactual_examples(leads: list[tuple[str, str]], rng: random.Random) -> list[Example]:
    """The Wikipedia questions of `wiki_examples`, asked about leads whose names and numbers were swapped
    (facts.counterfactual_lead): real prose whose answers the LM cannot know without the context."""
    examples = wiki_examples([counterfactual_lead(title, text, rng) for title, text in leads], rng)
    for ex in examples:
        ex.task = f"counterfactual-{ex.task}"
    return examples


def fact_examples(rng: random.Random, count: int) -> list[Example]:
    """Questions about invented entities (train/facts.py): answers only the context can give."""
    return [Example(c, formats.qa_prompt(q), a, "facts") for c, q, a in fact_questions(rng, count)]


def group_by_context(examples: list[Example]) -> list[list[Example]]:
    """Examples that share a context, in first-seen order (a context may be a list of passages: not hashable)."""
    groups: list[list[Example]] = []
    for ex in examples:
        match = next((g for g in groups if g[0].context == ex.context), None)
        if match is None:
            groups.append([ex])
        else:
            match.append(ex)
    return groups


INSTRUCTION_SOURCES = ("passages", "wiki", "counterfactual", "icl", "facts")


def instruction_examples(
    heldout: int, seed: int, sources=INSTRUCTION_SOURCES, facts: int = 0, open_fact_values: float = 0.0
) -> list[Example]:
    """The instruction mix from the chosen sources; `facts` synthetic fact questions when "facts" is one, their
    values drawn from the training half of `OpenValues` with chance `open_fact_values`."""
    unknown = set(sources) - set(INSTRUCTION_SOURCES)
    if unknown:
        raise GenAdapterError(f"unknown instruction sources {sorted(unknown)}; choose from {INSTRUCTION_SOURCES}")
    train_leads, _ = split_wiki(heldout)
    values = None
    if open_fact_values:
        values = OpenValues.from_leads(train_leads, heldout=False, probability=open_fact_values)
    rng = FactRandom(seed, values)  # draws what random.Random(seed) draws, until a fact slot takes an open value
    tasks = metaicl_train_tasks()
    examples = []
    if "passages" in sources:
        examples += passage_examples(tasks)
    if "wiki" in sources:
        examples += wiki_examples(train_leads, rng)
    if "counterfactual" in sources:
        examples += counterfactual_examples(train_leads, rng)
    add_distractors(examples, rng)
    if "icl" in sources:
        examples += icl_examples(tasks, rng)
    if "facts" in sources:
        examples += fact_examples(rng, facts)  # they carry their own distractor paragraphs
    if not examples:
        raise GenAdapterError(f"the instruction sources {list(sources)} gave no examples")
    rng.shuffle(examples)
    return examples
