"""Readout oracle: can a generator's frozen readout carry a context's facts at all?

For each held-out fact context, the state the generator writes is replaced by a free tensor that Adam fits
to that context's questions, with every generator and LM weight frozen. If the answer NLL falls close to 0,
the readout (A1, B and the LM) can express the facts, and what fails is the *writing* path
(A2, A3, γ → S → S̃). With `through_normaliser` the free tensor is the raw sum S and passes through the
generator's normalisation (SVD: every singular value 1), which shows how much that constraint limits it.
"""

from __future__ import annotations

import random

import torch

from ..adapter import GenerativeAdapter
from ..data import HELDOUT_SEED
from .data import Example, fact_examples, group_by_context
from .objectives import AnswerBatch, context_states


def readout_oracle(
    ga: GenerativeAdapter,
    examples: list[Example],
    steps: int = 25,
    lr: float = 3e-2,
    through_normaliser: bool = False,
    max_context_tokens: int = 384,
) -> list[dict]:
    """Per context: answer NLL with the written state, then after `steps` Adam steps on a free state."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    ga.generator.requires_grad_(False)  # only the free states learn
    results = []
    for items in group_by_context(examples):
        batch = AnswerBatch.build(ga, items, max_context_tokens)
        with torch.no_grad():
            written = context_states(ga, batch.contexts[:1])  # name -> (1, R1, R2); the generator's part only
            written = {key: written[key] for key in ga.generator.state_keys}
            tokens = sum(len(document) for document in batch.contexts[0])
            start = written if through_normaliser else ga.generator.normalize(written, tokens)
        free = {name: s.clone().requires_grad_(True) for name, s in start.items()}
        optimizer = torch.optim.Adam(free.values(), lr=lr)
        curve = []
        for step in range(steps + 1):
            states = ga.generator.normalize(free, tokens) if through_normaliser else free
            loss, _ = batch.answer_nll(ga, {name: s.expand(len(items), -1, -1) for name, s in states.items()})
            curve.append(loss.item())
            if step == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append({"answers": [ex.answer for ex in items], "nll_written": curve[0], "nll_fitted": curve[-1]})
    return results


def heldout_fact_oracle(ga: GenerativeAdapter, questions: int = 8, **kwargs) -> list[dict]:
    """The oracle on the first held-out fact questions (the ones `train heldout` scores)."""
    return readout_oracle(ga, fact_examples(random.Random(HELDOUT_SEED), questions), **kwargs)
