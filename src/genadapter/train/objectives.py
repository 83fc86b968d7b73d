"""Training losses: reconstruction + completion (pretraining) and answer / distillation (instruct).

Gradients reach only the generator: the LM is frozen, its context encoding runs without grad, and the
adapted forward passes gradients through the LM's activations into A1, B (and through S into γ, A2, A3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import formats
from ..adapter import GenerativeAdapter
from .config import TrainConfig
from .data import Example


def context_states(ga: GenerativeAdapter, contexts: list[list[list[int]]]) -> dict[str, Tensor]:
    """Sum of chunk states per context, with grad into the generator: name -> (E, R1, R2)."""
    chunks, owner = [], []
    for index, documents in enumerate(contexts):
        pieces = ga.chunk(documents)
        chunks += pieces
        owner += [index] * len(pieces)
    hidden, mask = ga.encode_chunks(chunks)
    owner_t = torch.tensor(owner, device=ga.device)
    out = {}
    for name, per_chunk in ga.generator.chunk_states(hidden, mask).items():
        out[name] = per_chunk.new_zeros((len(contexts), *per_chunk.shape[1:])).index_add(0, owner_t, per_chunk)
    return out


def adapted_logits(
    ga: GenerativeAdapter,
    ids: Tensor,
    mask: Tensor,
    normalized: dict[str, Tensor] | None,
    keep: Tensor | None = None,
) -> Tensor:
    """Logits of the LM with one normalised state per row (name -> (N, R1, R2)), or of the bare LM (None):
    (N, T, V), or (K, V) at the K positions where the bool `keep` (N, T) is True, in row-major order. Why
    `keep`: the vocabulary projection and its softmax cost as much per position as a fifth of the LM, and an
    instruction example scores only its few answer positions."""
    with ga.injector.activate(normalized):
        return ga.model(input_ids=ids, attention_mask=mask, logits_to_keep=0 if keep is None else keep).logits.float()


def next_token_positions(target_mask: Tensor) -> Tensor:
    """Bool (N, T): the positions whose *next* token is a target (target_mask (N, T) is 1 on target tokens)."""
    keep = torch.zeros_like(target_mask, dtype=torch.bool)
    keep[:, :-1] = target_mask[:, 1:].bool()
    return keep


def row_nll(logits: Tensor, ids: Tensor, target_mask: Tensor) -> Tensor:
    """Mean next-token NLL per row over positions where target_mask (of the predicted token) is 1: (N,)."""
    # (N·(T-1), V) rows keep the vocabulary contiguous: a transposed (N, V, T-1) input makes the softmax
    # and its backward several times slower on CPU
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1)
    weights = target_mask[:, 1:].float()
    return (nll * weights).sum(1) / weights.sum(1).clamp_min(1)


def pretrain_losses(
    ga: GenerativeAdapter,
    sequences: list[list[int]],
    config: TrainConfig,
    rng: np.random.Generator,
    with_adapter: bool = True,
    adapter_sequences: list[list[int]] | None = None,
) -> dict[str, Tensor]:
    """Completion (chunk i from the adapter of chunks < i) and reconstruction (a span of the text seen so far
    from the adapter of chunks ≤ i), every target fed alone with positions from 0. One frozen encoding of
    all chunks serves both tasks; prefix states are a cumulative sum.

    `adapter_sequences` builds the adapters from other text of the same length instead: the control that
    separates what the adapter knows about *this* context from a generic gain (style, domain)."""
    w, n, batch = ga.config.chunk_size, config.num_chunks, len(sequences)
    source = sequences if adapter_sequences is None else adapter_sequences
    if len(source) != batch or any(len(s) < n * w for s in source):
        raise ValueError(f"need {batch} adapter sequences of at least {n * w} tokens")
    prefix = None
    if with_adapter:
        hidden, mask = ga.encode_chunks([seq[i * w : (i + 1) * w] for seq in source for i in range(n)])
        # prefix sums (batch·n, R1, R2), each normalised once: completion rows reuse those of reconstruction
        sums = {
            k: v.view(batch, n, *v.shape[1:]).cumsum(1).flatten(0, 1)
            for k, v in ga.generator.chunk_states(hidden, mask).items()
        }
        prefix = {k: v.view(batch, n, *v.shape[1:]) for k, v in ga.generator.normalize(sums).items()}
    chunks = [seq[i * w : (i + 1) * w] for seq in sequences for i in range(n)]
    targets, states, tasks = [], [], []
    if config.completion:
        targets += [chunks[b * n + i] for b in range(batch) for i in range(1, n)]
        states.append({k: v[:, :-1] for k, v in prefix.items()} if prefix else None)
        tasks += ["completion"] * (batch * (n - 1))
    if config.reconstruction:
        for b in range(batch):
            for i in range(n):
                start = int(rng.integers(0, i * w + 1))
                targets.append(sequences[b][start : start + w])
        states.append(prefix)
        tasks += ["reconstruction"] * (batch * n)
    rows = {k: torch.cat([s[k].reshape(-1, *s[k].shape[2:]) for s in states]) for k in prefix} if prefix else None
    ids, mask = ga.pad(targets)
    nll = row_nll(adapted_logits(ga, ids, mask, rows), ids, mask)
    task_t = np.array(tasks)
    losses = {
        task: nll[torch.from_numpy(task_t == task)].mean() for task in ("completion", "reconstruction") if task in tasks
    }
    losses["loss"] = torch.stack(list(losses.values())).mean()
    return losses


def _truncate(documents: list[list[int]], budget: int) -> list[list[int]]:
    out = []
    for doc in documents:
        if budget <= 0:
            break
        out.append(doc[:budget])
        budget -= len(out[-1])
    return out


def prompt_answer_ids(ga: GenerativeAdapter, prompts: list[list[int]], answers: list[list[int]]) -> tuple[Tensor, ...]:
    """Padded prompt + answer rows: (ids, attention mask, answer mask), each (N, T); the answer mask is 1 on the
    answer tokens."""
    ids, mask = ga.pad([p + a for p, a in zip(prompts, answers, strict=True)])
    answer_mask = torch.zeros_like(mask)
    for row, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        answer_mask[row, len(p) : len(p) + len(a)] = 1
    return ids, mask, answer_mask


@dataclass
class AnswerBatch:
    """Token ids of a batch of examples: truncated contexts, closed-book prompts + answers, and which
    positions are answer tokens (the only ones scored)."""

    contexts: list[list[list[int]]]
    answers: list[list[int]]
    ids: Tensor  # (N, T) prompt + answer, padded
    mask: Tensor  # (N, T)
    answer_mask: Tensor  # (N, T), 1 on answer tokens

    @classmethod
    def build(cls, ga: GenerativeAdapter, examples: list[Example], max_context_tokens: int) -> AnswerBatch:
        tok = ga.tokenizer
        contexts = [_truncate(ga.tokenize_context(ex.context), max_context_tokens) for ex in examples]
        answers = [
            tok(" " + ex.answer.strip(), add_special_tokens=False)["input_ids"][:48] + [tok.eos_token_id]
            for ex in examples
        ]
        prompts = [tok(ga.format_prompt(ex.prompt), add_special_tokens=False)["input_ids"] for ex in examples]
        return cls(contexts, answers, *prompt_answer_ids(ga, prompts, answers))

    def answer_nll(self, ga: GenerativeAdapter, normalized: dict[str, Tensor] | None) -> tuple[Tensor, Tensor]:
        """(mean over rows of the mean answer-token NLL, logits (K, V) at the K positions that predict an answer
        token, row by row) of the LM with one normalised state per row, or of the bare LM (None)."""
        keep = next_token_positions(self.answer_mask)
        logits = adapted_logits(ga, self.ids, self.mask, normalized, keep)
        nll = F.cross_entropy(logits, self.ids[:, 1:][keep[:, :-1]], reduction="none")
        rows = keep.nonzero()[:, 0]
        counts = keep.sum(1)
        per_row = nll.new_zeros(len(counts)).index_add(0, rows, nll) / counts.clamp_min(1)
        return per_row.mean(), logits


def instruct_losses(
    ga: GenerativeAdapter, examples: list[Example], config: TrainConfig, with_adapter: bool = True
) -> dict[str, Tensor]:
    """Answer NLL of the adapted LM (prompt without context), and/or KL to the frozen LM that reads the
    context in its prompt (context distillation), over the answer tokens. `with_adapter=False` scores the
    bare LM (the closed-book reference)."""
    batch = AnswerBatch.build(ga, examples, config.max_context_tokens)
    normalized = ga.generator.normalize(context_states(ga, batch.contexts)) if with_adapter else None
    answer, student = batch.answer_nll(ga, normalized)
    losses = {}
    if config.objective in ("answer", "mix"):
        losses["answer"] = answer
    if config.objective in ("distill", "mix"):
        losses["distill"] = distillation_kl(ga, examples, batch.contexts, batch.answers, student)
    losses["loss"] = torch.stack(list(losses.values())).sum()
    return losses


def distillation_kl(ga, examples, contexts, answers, student: Tensor) -> Tensor:
    """KL(teacher ‖ student) per answer token; the teacher sees the (truncated) context in its prompt.
    `student`: (K, V) logits at the positions that predict the K answer tokens, row by row."""
    tok = ga.tokenizer
    teacher_prompts = []
    for ex, docs in zip(examples, contexts, strict=True):
        text = formats.with_context("\n\n".join(tok.decode(d) for d in docs), ex.prompt)
        teacher_prompts.append(tok(ga.format_prompt(text), add_special_tokens=False)["input_ids"])
    t_ids, t_mask, t_answer = prompt_answer_ids(ga, teacher_prompts, answers)
    with torch.no_grad():
        teacher = adapted_logits(ga, t_ids, t_mask, None, next_token_positions(t_answer))
    # both (K, V), K = the answer tokens of all rows in the same order
    t_logp, s_logp = teacher.log_softmax(-1), student.log_softmax(-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum() / len(t_logp)
