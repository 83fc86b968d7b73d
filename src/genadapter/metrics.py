"""SQuAD-normalised exact match and token F1 (the standard answer normalisation)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    def f1(gold: str) -> float:
        pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
        common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
        if not pred_tokens or not gold_tokens:
            return float(pred_tokens == gold_tokens)
        if common == 0:
            return 0.0
        precision, recall = common / len(pred_tokens), common / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max((f1(a) for a in answers), default=0.0)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1 when a gold answer's normalised tokens appear, in order and contiguous, in the normalised prediction: credit
    for knowing the answer that token F1 takes away from a longer reply ("6 PM or 11 PM" for "6 PM" scores F1 0.5)."""
    pred = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        if gold and any(pred[i : i + len(gold)] == gold for i in range(len(pred) - len(gold) + 1)):
            return 1.0
    return 0.0


_WORD = re.compile(r"\w+(?:['’]\w+)?")


def named_options(question: str, answers: Sequence[str]) -> tuple[list[str], int] | None:
    """([option A, option B], index of the gold one) when the question names its options as "A or B" with a gold
    answer on one side of the "or" (the other option is the same number of words on the other side); else None.
    Such questions are scored by the likelihood of each option, as multiple choice, so the answer's wording does
    not matter."""
    words = [(m.group().lower(), m.start(), m.end()) for m in _WORD.finditer(question)]
    tokens = [w for w, _, _ in words]
    for answer in answers:
        gold = [m.group().lower() for m in _WORD.finditer(answer)]
        n = len(gold)
        if not n:
            continue
        for i in range(len(tokens)):
            if tokens[i : i + n] != gold:
                continue
            after, before = i + n, i - 1  # gold, then "or", then the other option; or the other way round
            if after + n < len(tokens) and tokens[after] == "or":
                spans = [(i, after), (after + 1, after + 1 + n)]
                gold_index = 0
            elif before - n >= 0 and tokens[before] == "or":
                spans = [(before - n, before), (i, i + n)]
                gold_index = 1
            else:
                continue
            options = [question[words[a][1] : words[b - 1][2]] for a, b in spans]
            if len({o.lower() for o in options}) == 2:
                return options, gold_index
    return None
