"""Batched greedy answers and option scores for evaluation, with the shared prompt prefix computed once.

Rows that start with the same tokens (many questions about one long context in the prompt, or all the
options of one multiple-choice item) get the prefix's KV cache once; only the rest of each row is run.
This is a pure speed-up: the prompts, the chat formatting, greedy decoding (HF `generate`) and the
log-probability sums are those of `GenerativeAdapter.generate` / `.score` — the tests check that both
paths agree. Rows without a long common prefix, and rows with different adapters, go straight to
`GenerativeAdapter.generate` / `.score` in mini-batches.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..adapter import MERGE_MIN_NEW_TOKENS, GenerativeAdapter
from ..state import ContextState
from .costs import ModelCosts

StateRows = ContextState | Sequence[ContextState | None] | None


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token lists."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows)
    first = rows[0]
    for i in range(shortest):
        token = first[i]
        if any(r[i] != token for r in rows):
            return i
    return shortest


def _single_state(state: StateRows, n: int) -> tuple[bool, ContextState | None]:
    """(True, state) when every row uses the same adapter (or none)."""
    single = GenerativeAdapter.single_state(state)
    if single is not None or state is None or all(s is None for s in state):
        return True, single
    return False, None


class Engine:
    """Answers and scores prompt batches with one GenerativeAdapter (the base LM, ± adapters)."""

    def __init__(
        self,
        ga: GenerativeAdapter,
        batch_size: int = 8,
        share_prefix: bool = True,
        min_prefix: int = 32,
        cache_budget_mib: int = 1024,
    ):
        self.ga = ga
        self.batch_size = max(1, batch_size)
        self.share_prefix = share_prefix
        self.min_prefix = min_prefix
        self.cache_budget = cache_budget_mib * 2**20
        self.costs = ModelCosts.of(ga.model)

    # ---- tokens -------------------------------------------------------------------------------

    def encode(self, prompt: str, chat: bool) -> list[int]:
        """Token ids of a prompt exactly as GenerativeAdapter.generate/score feed it."""
        return self.ga.tokenizer(self.ga.format_prompt(prompt, chat), add_special_tokens=False)["input_ids"]

    def tokens(self, text: str) -> list[int]:
        return self.ga.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def count(self, text: str) -> int:
        return len(self.tokens(text))

    def _rows_per_batch(self, prefix_len: int) -> int:
        per_row = max(1, self.costs.kv_cache_bytes(prefix_len))
        return max(1, min(self.batch_size, self.cache_budget // per_row))

    def _shared_prefix(self, encoded: list[list[int]], state: StateRows, limit: int) -> int:
        """Prefix length to cache, or 0 when sharing is off / pointless / impossible."""
        single, _ = _single_state(state, len(encoded))
        if not (self.share_prefix and single and len(encoded) > 1):
            return 0
        shared = min(common_prefix(encoded), limit)
        return shared if shared >= self.min_prefix else 0

    @torch.no_grad()
    def _prefix_cache(self, prefix: list[int], state: ContextState | None):
        ids = torch.tensor([prefix], dtype=torch.long, device=self.ga.device)
        with self.ga.adapted(state, 1):
            return self.ga.model(input_ids=ids, use_cache=True).cache

    def _expanded(self, cache, rows: int):
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(rows)
        return cache

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], state: StateRows, chat: bool, max_new_tokens: int) -> list[str]:
        """Greedy answers, in the order of `prompts`."""
        prompts = list(prompts)
        if not prompts:
            return []
        encoded = [self.encode(p, chat) for p in prompts]
        shared = self._shared_prefix(encoded, state, min(len(e) for e in encoded) - 1)
        if shared:
            _, single = _single_state(state, len(prompts))
            return self._generate_shared(encoded, shared, single, max_new_tokens)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        answers: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows_state = state if state is None or isinstance(state, ContextState) else [state[i] for i in idx]
            out = self.ga.generate(
                [prompts[i] for i in idx], state=rows_state, max_new_tokens=max_new_tokens, chat=chat
            )
            for i, answer in zip(idx, out, strict=True):
                answers[i] = answer
        return answers

    @torch.no_grad()
    def _generate_shared(
        self, encoded: list[list[int]], shared: int, state: ContextState | None, max_new_tokens: int
    ) -> list[str]:
        ga, tok = self.ga, self.ga.tokenizer
        prefix = encoded[0][:shared]
        cache = self._prefix_cache(prefix, state)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list[str] = [""] * len(encoded)
        step = self._rows_per_batch(max(len(e) for e in encoded) + max_new_tokens)
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            tails = [encoded[i][shared:] for i in idx]
            width = max(len(t) for t in tails)
            # prefix | left-padded tail: positions come from the attention mask, as in left-padded generate
            ids = torch.full((len(idx), shared + width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            ids[:, :shared] = torch.tensor(prefix)
            mask[:, :shared] = 1
            for row, tail in enumerate(tails):
                ids[row, shared + width - len(tail) :] = torch.tensor(tail)
                mask[row, shared + width - len(tail) :] = 1
            ids, mask = ids.to(ga.device), mask.to(ga.device)
            with ga.adapted(state, len(idx), merge=max_new_tokens >= MERGE_MIN_NEW_TOKENS):
                out = ga.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    cache=self._expanded(cache, len(idx)),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            decoded = tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            for i, answer in zip(idx, decoded, strict=True):
                answers[i] = answer.strip()
        return answers

    # ---- scoring ------------------------------------------------------------------------------

    def score(self, prompts: Sequence[str], continuations: Sequence[str], state: StateRows, chat: bool) -> list[float]:
        """Summed log-probabilities of each continuation after its formatted prompt."""
        prompts, continuations = list(prompts), list(continuations)
        if not prompts:
            return []
        heads = [self.encode(p, chat) for p in prompts]
        shared = self._shared_prefix(heads, state, min(len(h) for h in heads) - 1)
        if shared:
            _, single = _single_state(state, len(prompts))
            return self._score_shared(heads, continuations, shared, single)
        order = sorted(range(len(prompts)), key=lambda i: len(heads[i]))
        scores = [0.0] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            rows_state = state if state is None or isinstance(state, ContextState) else [state[i] for i in idx]
            out = self.ga.score([prompts[i] for i in idx], [continuations[i] for i in idx], state=rows_state, chat=chat)
            for i, value in zip(idx, out, strict=True):
                scores[i] = value
        return scores

    @torch.no_grad()
    def _score_shared(
        self, heads: list[list[int]], continuations: list[str], shared: int, state: ContextState | None
    ) -> list[float]:
        ga = self.ga
        tails = [self.tokens(c) for c in continuations]
        prefix = heads[0][:shared]
        cache = self._prefix_cache(prefix, state)
        rests = [h[shared:] + t for h, t in zip(heads, tails, strict=True)]
        order = sorted(range(len(heads)), key=lambda i: len(rests[i]))
        scores = [0.0] * len(heads)
        step = self._rows_per_batch(shared + max(len(r) for r in rests))
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            width = max(len(rests[i]) for i in idx)
            ids = torch.full((len(idx), width), ga.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), shared + width), dtype=torch.long)
            mask[:, :shared] = 1
            for row, i in enumerate(idx):
                ids[row, : len(rests[i])] = torch.tensor(rests[i])
                mask[row, shared : shared + len(rests[i])] = 1
            positions = (torch.arange(width) + shared).unsqueeze(0).expand(len(idx), -1)
            ids, mask, positions = ids.to(ga.device), mask.to(ga.device), positions.to(ga.device)
            with ga.adapted(state, len(idx)):
                logits = ga.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._expanded(cache, len(idx))
                ).logits
            logprobs = logits.float().log_softmax(-1)
            for row, i in enumerate(idx):
                head_rest = len(heads[i]) - shared  # tokens of the prompt after the prefix (>= 1)
                n = len(tails[i])
                positions_i = torch.arange(head_rest - 1, head_rest + n - 1, device=ga.device)
                targets = ids[row, head_rest : head_rest + n]
                scores[i] = logprobs[row, positions_i, targets].sum().item()
        return scores
