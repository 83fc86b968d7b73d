"""Scenario 4 — storage: facts that cannot be guessed or picked from a list, hidden in neutral text.

Each context is held-out Wikipedia text (leads no training here reads) of about `length` tokens with `facts`
invented facts inserted at random sentence boundaries. A fact ties an invented name to a value nobody could know
beforehand: a 6-digit access code, or a made-up word (a town, a pet's name, a lake). Every fact is asked about
once, and an answer counts when it contains the value (the knowledge scenario's `contains`). Closed-book can only
guess, so anything above it is what the context left behind; the unrelated-text control shows how much of that
is the context's own content.

The items are generated from a seed and written to `items.jsonl` in the output directory, with their split
(dev items pick the template and are never reported) and nominal length; the knowledge scenario then runs them.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data import split_wiki
from ..errors import GenAdapterError
from .knowledge import KnowledgeConfig, run_knowledge

DEFAULT_LENGTHS = [64, 256, 1024, 4096]
DEFAULT_CONTEXTS = 12  # test contexts per length
DEV_CONTEXTS = 32
ONSETS = "b br d dr f g gl k kr l m n p pl r s st t tr v z".split()
VOWELS = "a e i o u ai ou".split()
CODAS = ["", "", *"n r l s th m k".split()]
# (fact, question): {name} is an invented name, {value} a made-up word, {code} a 6-digit number
KINDS = [
    ("The access code of the {name} account is {code}.", "What is the access code of the {name} account?"),
    ("{name} was born in the town of {value}.", "In which town was {name} born?"),
    ("The pet of {name} is a parrot called {value}.", "What is the name of the parrot of {name}?"),
    ("The river {name} flows into Lake {value}.", "Into which lake does the river {name} flow?"),
]


@dataclass
class StorageConfig(KnowledgeConfig):
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    facts: int = 1  # facts per context
    contexts: int = DEFAULT_CONTEXTS  # test contexts per length


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word, capitalised."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).title()


def invent_fact(rng: random.Random) -> tuple[str, str, str]:
    """(fact sentence, question, answer)."""
    fact, question = rng.choice(KINDS)
    name = f"{pseudo_word(rng, 2)} {pseudo_word(rng, 2)}" if "{name} was" in fact else pseudo_word(rng, 3)
    answer = str(rng.randrange(100000, 1000000)) if "{code}" in fact else pseudo_word(rng, rng.choice([2, 3]))
    values = {"name": name, "value": answer, "code": answer}
    return fact.format(**values), question.format(**values), answer


def filler_sentences() -> list[str]:
    """Sentences of the held-out Wikipedia leads, in a fixed order."""
    _, heldout = split_wiki()
    return [s.strip() + "." for _, text in heldout for s in text.split(". ") if len(s.split()) >= 4]


def build_items(tokenizer, lengths: list[int], facts: int, contexts: int, dev: int, seed: int) -> list[dict]:
    """Knowledge-scenario rows (context, question, answers, split, length): `contexts` test contexts per length, and
    `dev` dev contexts spread over the lengths. A context holds whole filler sentences, then the start of the next
    one up to `length` tokens (counted alone: joining texts may move the count by a token or two)."""
    if facts < 1 or contexts < 1 or not lengths or min(lengths) < 1:
        raise GenAdapterError("storage needs at least one fact, one context and positive lengths")

    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sentences = filler_sentences()
    rng = random.Random(seed)
    plan = [("test", length) for length in lengths for _ in range(contexts)]
    plan += [("dev", lengths[i % len(lengths)]) for i in range(dev)]
    rows = []
    for split, length in plan:
        invented = [invent_fact(rng) for _ in range(facts)]
        left = length - sum(len(tokens(" " + fact)) for fact, _, _ in invented)
        if left < 0:
            raise GenAdapterError(f"a context of {length} tokens cannot hold {facts} facts ({length - left} tokens)")
        body, index = [], rng.randrange(len(sentences))
        while left > 0:
            sentence = tokens(" " + sentences[index % len(sentences)])
            body.append(tokenizer.decode(sentence[:left]).strip())
            left -= len(sentence)
            index += 1
        for fact, _, _ in invented:
            body.insert(rng.randrange(len(body) + 1), fact)
        context = " ".join(body)
        for _, question, answer in invented:
            row = {"context": context, "question": question, "answers": [answer], "split": split, "length": length}
            rows.append(row)
    return rows


def run_storage(config: StorageConfig, ga=None) -> dict:
    """Generate the items into the output directory and evaluate them as knowledge QA, by nominal length."""
    from .runner import load_adapter

    ga = ga or load_adapter(config)
    out = Path(config.out or "out/eval/storage")
    out.mkdir(parents=True, exist_ok=True)
    dev = DEV_CONTEXTS if config.dev is None else config.dev

    rows = build_items(ga.tokenizer, sorted(set(config.lengths)), config.facts, config.contexts, dev, config.seed)
    data = out / "items.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = replace(config, data=data, limit=0, dev=dev, out=out)
    knowledge = KnowledgeConfig(**{name: getattr(settings, name) for name in KnowledgeConfig.__dataclass_fields__})
    return run_knowledge(knowledge, ga, scenario_name="storage")
