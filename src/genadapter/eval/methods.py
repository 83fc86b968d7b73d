"""The four methods compared in every scenario, behind one interface, one control and one variant.

- `closed-book`: the base LM with the question alone.
- `prompting`: the context in the prompt (`formats.with_context`), cut from the LEFT to fit the window.
- `sft`: test-time fine-tuning of a PEFT LoRA on the context tokens (next-token loss), removed afterwards.
- `genadapter`: `ga.absorb(context)`, then the question alone with the generated adapter.
- `genadapter-unrelated` (a control, only when asked for): the same with the adapter of unrelated text of
  the context's length (held-out Wikipedia leads). What genadapter gains over it comes from the
  context's content; what it shares with it, any adapter would give.
- `genadapter-half` (a variant, only when asked for): genadapter with its state stored at half precision, as
  the service stores it; paired with genadapter it measures what that storage costs.

All four build prompts from the same templates and answer through the same `Engine` (same chat format,
same greedy decoding, same option scoring); they differ only in what they do with the context.
"""

from __future__ import annotations

import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .. import formats
from ..errors import GenAdapterError
from ..state import ContextState
from .costs import generator_flops
from .engine import Engine
from .templates import Template

METHODS = ("closed-book", "prompting", "sft", "genadapter")
CONTROLS = ("genadapter-unrelated", "genadapter-half")  # the control and a variant: run only when named in --methods


def parse_methods(spec: str | Sequence[str] | None) -> list[str]:
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec or METHODS)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in METHODS + CONTROLS]
    if unknown or not names:
        known = ", ".join(METHODS + CONTROLS)
        raise GenAdapterError(f"unknown method(s) {unknown or names}; choose from {known}")
    return list(dict.fromkeys(names))


@dataclass
class SFTConfig:
    """Test-time fine-tuning baseline: a fresh LoRA trained on each context's tokens (next-token loss)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_length: int = 512  # the context is cut into training sequences of at most this many tokens
    batch_size: int = 1  # sequences per optimizer step (1 keeps the peak memory of an 8K context low)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.rank, self.epochs, self.max_length, self.batch_size) < 1 or self.lr <= 0:
            raise GenAdapterError("SFT rank, epochs, max_length, batch_size and lr must be positive")
        if self.max_length < 2:
            raise GenAdapterError("SFT max_length must be at least 2 tokens")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SFTConfig:
        """From the `--sft KEY=VALUE` settings, e.g. {"epochs": 5}; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GenAdapterError(f"--sft expects KEY=VALUE with KEY one of {sorted(known)}, got {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise GenAdapterError(f"bad SFT config: {exc}") from exc


@dataclass
class EvalContext:
    """What a method adapts to: one or more documents (e.g. one tweet each) with a stable id."""

    id: str
    documents: list[str]

    @property
    def text(self) -> str:
        return "\n\n".join(d for d in self.documents if d.strip())

    @property
    def empty(self) -> bool:
        return not self.text.strip()


@dataclass
class Adapted:
    """What a method keeps for one context between adapting and answering."""

    context: EvalContext
    state: ContextState | None = None
    context_ids: list[int] | None = None
    handle: Any = None  # sft: the PeftModel wrapping the base LM until release()
    kept_bytes: int = 0
    flops: float = 0.0
    extra: dict = field(default_factory=dict)
    _decoded: dict[int, str] = field(default_factory=dict, repr=False)


@dataclass
class Prompted:
    """A prompt as sent, and how much of the context it kept."""

    text: str
    chat: bool
    tokens: int
    truncated: bool = False
    dropped_tokens: int = 0


class Method:
    """Base class: no use of the context at all (closed-book)."""

    name = "closed-book"
    one_context_at_a_time = False  # sft: the LoRA of one context is live in the model until release()
    per_context = False  # rows of one context share a prompt prefix or an adapter: batch them together

    def __init__(self, engine: Engine, window: int):
        self.engine = engine
        self.window = window

    @property
    def ga(self):
        return self.engine.ga

    def adapt(self, context: EvalContext) -> Adapted:
        return Adapted(context)

    def release(self, adapted: Adapted) -> None:
        pass

    def state(self, adapted: Adapted) -> ContextState | None:
        return None

    def prompt(self, adapted: Adapted, template: Template, query: str, reserve: int) -> Prompted:
        text = template(query)
        return Prompted(text, template.chat, len(self.engine.encode(text, template.chat)))

    def answer_flops(self, adapted: Adapted, tokens: int) -> float:
        return self.engine.costs.forward_flops(tokens)

    def _groups(self, adapted: Sequence[Adapted], chats: Sequence[bool]) -> list[list[int]]:
        """Row indices answered by one engine call: one chat flag each; with `per_context`, the rows of a
        context with several rows together (one shared prefix / one adapter), the lone rows pooled."""
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, (a, chat) in enumerate(zip(adapted, chats, strict=True)):
            # an empty context gives a row nothing of its own: batch it as closed-book does, so the two are bit-equal
            groups[(id(a) if self.per_context and not a.context.empty else 0, chat)].append(i)
        out, singles = [], defaultdict(list)
        for (_, chat), idx in groups.items():
            if len(idx) > 1 or not self.per_context:
                out.append(idx)
            else:
                singles[chat] += idx
        return out + list(singles.values())

    def _states(self, adapted: Sequence[Adapted], idx: list[int]):
        states = [self.state(adapted[i]) for i in idx]
        return None if all(s is None for s in states) else states

    def generate(
        self, rows: Sequence[tuple[Adapted, Template, str]], max_new_tokens: int
    ) -> list[tuple[str, Prompted]]:
        """Greedy answers of (adapted context, template, query) rows."""
        adapted = [a for a, _, _ in rows]
        prompted = [self.prompt(a, t, q, max_new_tokens) for a, t, q in rows]
        answers = [""] * len(rows)
        for idx in self._groups(adapted, [p.chat for p in prompted]):
            out = self.engine.generate(
                [prompted[i].text for i in idx], self._states(adapted, idx), prompted[idx[0]].chat, max_new_tokens
            )
            for i, answer in zip(idx, out, strict=True):
                answers[i] = answer
        return list(zip(answers, prompted, strict=True))

    def score(self, rows: Sequence[tuple[Adapted, Template, str, str, int]]) -> list[tuple[float, Prompted]]:
        """Summed log-probs of (adapted, template, query, continuation, reserve) rows; `reserve` is the
        number of tokens kept free in the window (the longest continuation of the item)."""
        adapted = [r[0] for r in rows]
        prompted = [self.prompt(a, t, q, reserve) for a, t, q, _, reserve in rows]
        scores = [0.0] * len(rows)
        for idx in self._groups(adapted, [p.chat for p in prompted]):
            out = self.engine.score(
                [prompted[i].text for i in idx],
                [rows[i][3] for i in idx],
                self._states(adapted, idx),
                prompted[idx[0]].chat,
            )
            for i, value in zip(idx, out, strict=True):
                scores[i] = value
        return list(zip(scores, prompted, strict=True))


class ClosedBook(Method):
    name = "closed-book"


class Prompting(Method):
    """The context precedes the prompt, its oldest tokens dropped when the window is too small."""

    name = "prompting"
    safety_tokens = 4
    per_context = True

    def adapt(self, context: EvalContext) -> Adapted:
        ids = self.engine.tokens(context.text)
        kept = self.engine.costs.kv_cache_bytes(min(len(ids), self.window))  # the KV cache of what fits
        return Adapted(context, context_ids=ids, kept_bytes=kept)

    def _context_text(self, adapted: Adapted, keep: int) -> str:
        if keep not in adapted._decoded:
            ids = adapted.context_ids or []
            adapted._decoded[keep] = self.ga.tokenizer.decode(ids[len(ids) - keep :]) if keep > 0 else ""
        return adapted._decoded[keep]

    def prompt(self, adapted: Adapted, template: Template, query: str, reserve: int) -> Prompted:
        question = template(query)
        total = len(adapted.context_ids or [])
        if not total:
            return super().prompt(adapted, template, query, reserve)
        overhead = len(self.engine.encode(formats.with_context("", question), template.chat))
        keep = min(total, max(0, self.window - overhead - reserve - self.safety_tokens))
        while True:  # re-tokenising the cut text can shift a token or two: shrink until it fits
            context = self._context_text(adapted, keep)
            text = formats.with_context(context, question) if context else question
            tokens = len(self.engine.encode(text, template.chat))
            if tokens + reserve <= self.window or keep == 0:
                break
            keep = max(0, keep - max(1, tokens + reserve - self.window))
        return Prompted(text, template.chat, tokens, truncated=keep < total, dropped_tokens=total - keep)


class FineTuning(Method):
    """A fresh PEFT LoRA per context, trained on the context tokens; `release` restores the base LM."""

    name = "sft"
    one_context_at_a_time = True

    def __init__(self, engine: Engine, window: int, config: SFTConfig | None = None):
        super().__init__(engine, window)
        self.config = config or SFTConfig()
        self._live: Adapted | None = None

    def adapt(self, context: EvalContext) -> Adapted:
        if self._live is not None:
            raise GenAdapterError("sft: release() the previous context before adapting to another")
        from peft import LoraConfig, get_peft_model

        cfg, model = self.config, self.ga.model
        ids = self.engine.tokens(context.text)
        count = -(-len(ids) // cfg.max_length)  # as few pieces as fit, of equal length (no padding waste)
        size = -(-len(ids) // count) if count else 0
        pieces = [p for p in (ids[i : i + size] for i in range(0, len(ids), size or 1)) if len(p) > 1]
        adapted = Adapted(context, context_ids=ids)
        if not pieces:
            return adapted
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lora)
        adapted.handle = peft_model
        self._live = adapted
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = random.Random(cfg.seed)
        pad = self.ga.tokenizer.pad_token_id
        losses, steps = [], 0
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                order = list(range(len(pieces)))
                rng.shuffle(order)
                for start in range(0, len(order), cfg.batch_size):
                    batch = [pieces[i] for i in order[start : start + cfg.batch_size]]
                    input_ids, mask = self.ga.pad(batch)
                    labels = input_ids.masked_fill(mask == 0, -100)
                    input_ids = input_ids.masked_fill(mask == 0, pad)
                    loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    steps += 1
        adapted.kept_bytes = sum(p.numel() * p.element_size() for p in params)
        adapted.flops = self.engine.costs.train_flops(len(ids), cfg.epochs)
        adapted.extra = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1]}
        return adapted

    def release(self, adapted: Adapted) -> None:
        if adapted.handle is not None:
            adapted.handle.unload()  # takes the LoRA layers out: the original modules are back
            adapted.handle = None
            self.ga.model.requires_grad_(False).eval()
        if self._live is adapted:
            self._live = None

    def _groups(self, adapted: Sequence[Adapted], chats: Sequence[bool]) -> list[list[int]]:
        if len({id(a) for a in adapted if a.handle is not None}) > 1:
            raise GenAdapterError("sft answers the rows of one adapted context at a time")
        return super()._groups(adapted, chats)


class GenAdapterMethod(Method):
    """Absorb the context into a state; answer the question alone with the generated adapter."""

    name = "genadapter"
    per_context = True

    def adapt(self, context: EvalContext) -> Adapted:
        docs = [d for d in context.documents if d.strip()]
        if not docs:
            return Adapted(context)
        state = self.ga.absorb(docs, batch_size=self.engine.batch_size, progress=False)
        extra_absorb, _ = generator_flops(self.ga.generator, state.num_tokens, self.engine.costs.vocab_size)
        flops = 2.0 * self.engine.costs.decoder_params * state.num_tokens + extra_absorb
        return Adapted(context, state=state, kept_bytes=state.nbytes, flops=flops)

    def state(self, adapted: Adapted) -> ContextState | None:
        return adapted.state

    def answer_flops(self, adapted: Adapted, tokens: int) -> float:
        base = super().answer_flops(adapted, tokens)
        if adapted.state is None:
            return base
        return base + generator_flops(self.ga.generator, 0, self.engine.costs.vocab_size)[1] * tokens


class HalfStateMethod(GenAdapterMethod):
    """genadapter with the state as the service stores it (`ContextState.to_bytes(half=True)`), to measure what
    half-precision storage costs in answers."""

    name = "genadapter-half"

    def adapt(self, context: EvalContext) -> Adapted:
        adapted = super().adapt(context)
        if adapted.state is not None:
            stored = adapted.state.to_bytes(half=True)
            adapted.state = ContextState.from_bytes(stored)
            adapted.kept_bytes = len(stored)
        return adapted


class UnrelatedAdapterMethod(GenAdapterMethod):
    """Control: the adapter of unrelated text as long as the context (in tokens), in place of the context's."""

    name = "genadapter-unrelated"

    def __init__(self, engine: Engine, window: int, unrelated: str | None = None):
        super().__init__(engine, window)
        self._unrelated = unrelated  # default: held-out Wikipedia leads, read on first use
        self._pool: list[int] = []

    def unrelated_text(self, context: EvalContext, tokens: int) -> str:
        """`tokens` tokens of the unrelated text, starting at an offset fixed by the context id."""
        if not self._pool:
            if self._unrelated is None:
                from ..data import split_wiki

                _, heldout = split_wiki()  # leads no training run saw
                self._unrelated = "\n\n".join(lead for _, lead in heldout)
            self._pool = self.engine.tokens(self._unrelated)
            if not self._pool:
                raise GenAdapterError("the unrelated text of the genadapter-unrelated control is empty")
        start = random.Random(context.id).randrange(len(self._pool))
        repeats = (start + tokens) // len(self._pool) + 1
        return self.ga.tokenizer.decode((self._pool * repeats)[start : start + tokens])

    def adapt(self, context: EvalContext) -> Adapted:
        tokens = self.engine.count(context.text) if not context.empty else 0
        if not tokens:
            return Adapted(context)
        adapted = super().adapt(EvalContext(context.id, [self.unrelated_text(context, tokens)]))
        adapted.context = context
        return adapted


def make_methods(names: Sequence[str], engine: Engine, window: int, sft: SFTConfig | None = None) -> list[Method]:
    classes = {
        "closed-book": ClosedBook,
        "prompting": Prompting,
        "genadapter": GenAdapterMethod,
        "genadapter-unrelated": UnrelatedAdapterMethod,
        "genadapter-half": HalfStateMethod,
    }
    out: list[Method] = []
    for name in parse_methods(list(names)):
        out.append(FineTuning(engine, window, sft) if name == "sft" else classes[name](engine, window))
    return out
