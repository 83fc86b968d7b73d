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


def to_device(values: list[int], device: torch.device) -> Tensor:
    """A list of ints as a tensor on `device`, without waiting for the device: a plain copy to a GPU waits for all
    the work queued before it, a non-blocking one from pinned memory does not."""
    tensor = torch.tensor(values)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def context_states(ga: GenerativeAdapter, contexts: list[list[list[int]]]) -> dict[str, Tensor]:
    """Sum of chunk states per context, with grad into the generator: name -> (E, R1, R2); plus the next-token
    memory sums when the generator has a memory (with grad into its key projection when that is learned)."""
    chunks, owner = [], []
    for index, documents in enumerate(contexts):
        pieces = ga.chunk(documents)
        chunks += pieces
        owner += [index] * len(pieces)
    owner_t = to_device(owner, ga.device)
    hidden, mask, out = ga.encode_chunks_with_memory(chunks, owner_t, len(contexts))
    for name, per_chunk in ga.generator.chunk_states(hidden, mask).items():
        out[name] = per_chunk.new_zeros((len(contexts), *per_chunk.shape[1:])).index_add(0, owner_t, per_chunk)
    return out


def context_adapters(ga: GenerativeAdapter, contexts: list[list[list[int]]]) -> dict[str, Tensor]:
    """What the LM is run with for each context: normalised states (E, R1, R2), plus memory maps when on."""
    tokens = to_device([sum(len(doc) for doc in documents) for documents in contexts], ga.device)
    return ga.generator.adapters(context_states(ga, contexts), tokens)


def adapted_logits(
    ga: GenerativeAdapter,
    ids: Tensor,
    mask: Tensor,
    factors: dict[str, Tensor] | None,
    keep: Tensor | None = None,
) -> Tensor:
    """Logits of the LM with one normalised state per row (name -> (N, R1, R2)), or of the bare LM (None):
    (N, T, V), or (K, V) at the K positions where the bool `keep` (N, T) is True, in row-major order. Why
    `keep`: the vocabulary projection and its softmax cost as much per position as a fifth of the LM, and an
    instruction example scores only its few answer positions."""
    with ga.injector.activate(factors):
        return ga.model(input_ids=ids, attention_mask=mask, logits_to_keep=0 if keep is None else keep).logits.float()


def next_token_positions(target_mask: Tensor) -> Tensor:
    """Bool (N, T): the positions whose *next* token is a target (target_mask (N, T) is 1 on target tokens)."""
    keep = torch.zeros_like(target_mask, dtype=torch.bool)
    keep[:, :-1] = target_mask[:, 1:].bool()
    return keep


class _LinearCrossEntropy(torch.autograd.Function):
    """NLL of `targets` (K,) under softmax(hidden (K, d) @ weightᵀ (d, V)), `chunk` rows at a time, so the (K, V)
    logits never exist at once: for one pretraining sequence of SmolLM2 (889 positions × 49,152 tokens) they are
    175 MB, and the logits, their log-softmax, the zero-filled NLL gradient and the log-softmax gradient were each
    such a block, freshly page-faulted on every step. The gradient w.r.t. hidden, (softmax − onehot) · weight per
    row, is formed in the forward pass and scaled by the incoming per-row gradient in backward; the weight (the
    frozen LM head) gets none."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            dtype = torch.promote_types(hidden.dtype, torch.float32)  # half precision never reaches the softmax
            h, w = hidden.to(dtype), weight.to(dtype)
            nll = h.new_empty(len(h))
            grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
            for start in range(0, len(h), chunk):
                rows = slice(start, start + chunk)
                logits = h[rows] @ w.T  # (c, V)
                lse = logits.logsumexp(-1)
                picked = targets[rows].unsqueeze(1)
                nll[rows] = lse - logits.gather(1, picked).squeeze(1)
                if grad is not None:
                    probs = logits.sub_(lse.unsqueeze(1)).exp_()
                    probs.scatter_add_(1, picked, probs.new_full(picked.shape, -1.0))
                    grad[rows] = probs @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll: Tensor) -> tuple[Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_nll.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 128) -> Tensor:
    """Per-row NLL (K,) of `targets` under the vocabulary projection `weight` (V, d) of `hidden` (K, d), with a
    gradient for `hidden` only (see _LinearCrossEntropy). 128 rows of SmolLM2's vocabulary are 25 MB."""
    if weight.requires_grad:
        raise ValueError("linear_cross_entropy gives no gradient to the vocabulary projection; it must be frozen")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def plain_lm_head(model) -> bool:
    """Whether the LM's logits are exactly hidden @ lm_headᵀ (no bias, scale or soft-capping), so that the loss
    can be taken from the hidden states with linear_cross_entropy."""
    head, text = model.get_output_embeddings(), model.config.get_text_config()
    scaled = any(getattr(text, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale"))
    return isinstance(head, torch.nn.Linear) and head.bias is None and not scaled


def row_means(values: Tensor, keep: Tensor) -> Tensor:
    """Mean per row (N,) of `values` (K,), given at the K True positions of the bool `keep` (N, T), row by row.
    The row of the k-th value is the number of rows whose running count of kept positions is ≤ k (searchsorted,
    not keep.nonzero(), whose size would have to come back from the device)."""
    counts = keep.sum(1)
    rows = torch.searchsorted(counts.cumsum(0), torch.arange(len(values), device=values.device), right=True)
    return values.new_zeros(len(counts)).index_add(0, rows, values) / counts.clamp_min(1)


def target_nll(
    ga: GenerativeAdapter,
    ids: Tensor,
    mask: Tensor,
    target_mask: Tensor,
    factors: dict[str, Tensor] | None,
    with_logits: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Mean next-token NLL per row over its target tokens (target_mask (N, T) is 1 on them): (N,); with
    `with_logits`, also the logits (K, V) at the K positions that predict a target token, row by row (what
    distillation needs). Only those positions reach the vocabulary projection; without `with_logits` (and with a
    plain LM head) through linear_cross_entropy, so no (K, V) block is formed at all."""
    keep = next_token_positions(target_mask)
    targets = ids[:, 1:][keep[:, :-1]]
    logits = None
    if with_logits or not plain_lm_head(ga.model):
        logits = adapted_logits(ga, ids, mask, factors, keep)
        nll = F.cross_entropy(logits, targets, reduction="none")
    else:
        with ga.injector.activate(factors):
            hidden = ga.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
        nll = linear_cross_entropy(hidden, ga.model.get_output_embeddings().weight, targets)
    return row_means(nll, keep), logits if with_logits else None


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
        chunks = [seq[i * w : (i + 1) * w] for seq in source for i in range(n)]
        owner = torch.arange(len(chunks), device=ga.device)
        hidden, mask, per_chunk = ga.encode_chunks_with_memory(chunks, owner, len(chunks))
        per_chunk |= ga.generator.chunk_states(hidden, mask)
        # prefix sums (batch·n, R1, R2), each normalised once: completion rows reuse those of reconstruction
        sums = {k: v.view(batch, n, *v.shape[1:]).cumsum(1).flatten(0, 1) for k, v in per_chunk.items()}
        tokens = (w * torch.arange(1, n + 1, device=ga.device)).repeat(batch)  # w · (i + 1) per prefix
        prefix = {k: v.view(batch, n, *v.shape[1:]) for k, v in ga.generator.adapters(sums, tokens).items()}
    chunks = [seq[i * w : (i + 1) * w] for seq in sequences for i in range(n)]
    targets, tasks = [], []
    if config.completion:
        targets += [chunks[b * n + i] for b in range(batch) for i in range(1, n)]
        tasks += ["completion"] * (batch * (n - 1))
    if config.reconstruction:
        for b in range(batch):
            for i in range(n):
                start = int(rng.integers(0, i * w + 1))
                targets.append(sequences[b][start : start + w])
        tasks += ["reconstruction"] * (batch * n)

    def per_target(states: dict[str, Tensor]) -> dict[str, Tensor]:
        """One state per target row, in the order of `targets`, from prefix states (batch, n, R1, R2)."""
        parts = ([{k: v[:, :-1] for k, v in states.items()}] if config.completion else []) + (
            [states] if config.reconstruction else []
        )
        return {k: torch.cat([part[k].reshape(-1, *part[k].shape[2:]) for part in parts]) for k in states}

    ids, mask = ga.pad(targets)
    contrast = bool(config.contrast_weight) and prefix is not None and adapter_sequences is None
    if contrast:
        if batch < 2:
            raise ValueError("contrast_weight pairs each sequence with another of its (micro-)batch: need at least 2")
        # the same targets also read with the adapter of the batch's next sequence: HeldOut's control, as a loss
        own, other = per_target(prefix), per_target({k: v.roll(1, dims=0) for k, v in prefix.items()})
        both = {k: torch.cat([own[k], other[k]]) for k in own}
        nll, nll_other = target_nll(ga, ids.repeat(2, 1), mask.repeat(2, 1), mask.repeat(2, 1), both)[0].chunk(2)
    else:
        nll, _ = target_nll(ga, ids, mask, mask, per_target(prefix) if prefix else None)
    completion = tasks.count("completion")  # the rows of `targets`: completion first, then reconstruction
    parts = {"completion": nll[:completion], "reconstruction": nll[completion:]}  # slices: no mask to send over
    losses = {task: part.mean() for task, part in parts.items() if task in tasks}
    losses["loss"] = torch.stack(list(losses.values())).mean()
    if contrast:
        losses["contrast"] = torch.relu(config.contrast_margin - (nll_other - nll)).mean()
        losses["loss"] = losses["loss"] + config.contrast_weight * losses["contrast"]
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

    def answer_nll(
        self, ga: GenerativeAdapter, factors: dict[str, Tensor] | None, with_logits: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(mean over rows of the mean answer-token NLL, and with `with_logits` the logits (K, V) at the K positions
        that predict an answer token, row by row) of the LM with one normalised state per row, or of the bare LM
        (None)."""
        per_row, logits = target_nll(ga, self.ids, self.mask, self.answer_mask, factors, with_logits)
        return per_row.mean(), logits


def instruct_losses(
    ga: GenerativeAdapter, examples: list[Example], config: TrainConfig, with_adapter: bool = True
) -> dict[str, Tensor]:
    """Answer NLL of the adapted LM (prompt without context), and/or KL to the frozen LM that reads the
    context in its prompt (context distillation), over the answer tokens. `with_adapter=False` scores the
    bare LM (the closed-book reference)."""
    batch = AnswerBatch.build(ga, examples, config.max_context_tokens)
    factors = context_adapters(ga, batch.contexts) if with_adapter else None
    answer, student = batch.answer_nll(ga, factors, with_logits=config.objective in ("distill", "mix"))
    losses = {}
    if config.objective in ("answer", "mix"):
        losses["answer"] = answer
    if config.objective in ("distill", "mix"):
        losses["distill"] = distillation_kl(ga, examples, batch.contexts, batch.answers, student)
    losses["loss"] = torch.stack(list(losses.values())).sum()
    return losses


def distillation_kl(ga, examples, contexts, answers, student: Tensor) -> Tensor:
    """KL(teacher ‖ student) per answer token, averaged per row and then over rows (like the answer NLL, so
    micro-batches add up to the batch); the teacher sees the (truncated) context in its prompt.
    `student`: (K, V) logits at the positions that predict the K answer tokens, row by row."""
    tok = ga.tokenizer
    teacher_prompts = []
    for ex, docs in zip(examples, contexts, strict=True):
        text = formats.with_context("\n\n".join(tok.decode(d) for d in docs), ex.prompt)
        teacher_prompts.append(tok(ga.format_prompt(text), add_special_tokens=False)["input_ids"])
    t_ids, t_mask, t_answer = prompt_answer_ids(ga, teacher_prompts, answers)
    t_keep = next_token_positions(t_answer)  # per row as many positions as the student's, in the same order
    with torch.no_grad():
        teacher = adapted_logits(ga, t_ids, t_mask, None, t_keep)
    # both (K, V), K = the answer tokens of all rows in the same order
    t_logp, s_logp = teacher.log_softmax(-1), student.log_softmax(-1)
    return row_means((t_logp.exp() * (t_logp - s_logp)).sum(-1), t_keep).mean()
