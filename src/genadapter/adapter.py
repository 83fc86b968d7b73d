"""GenerativeAdapter: the public API — absorb a context into a state, answer with it, export it."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .base_model import EMBEDDED_MODEL, load_base
from .config import GeneratorConfig
from .errors import GenAdapterError, IncompatibleStateError
from .fileio import PEFT_MARKER, write_dir_atomic
from .generator import AdapterGenerator
from .inject import AdapterInjector
from .memory import memory_key
from .state import ContextState

log = logging.getLogger(__name__)

SHIPPED_GENERATOR = Path(__file__).parent / "assets" / EMBEDDED_MODEL
Context = str | Sequence[str] | Sequence[int] | Tensor
StateArg = ContextState | Sequence[ContextState | None] | None
# generate merges a single state from this many new tokens on: merging the shipped generator's state costs about as
# much as the hooks' overhead on 20 tokens (docs/benchmarks.md, "Adapting and answering")
MERGE_MIN_NEW_TOKENS = 24


def _same_basis(cached: tuple, current: tuple) -> bool:
    """Whether cached factors were derived from the same inputs: the same tensor objects (held by the cache, so
    their ids cannot be reused), unchanged in place since (torch's version counters), and the same token count."""
    (tokens, device, sums, weights), (tokens_now, device_now, sums_now, weights_now) = cached, current
    return (
        tokens == tokens_now
        and device == device_now
        and all(
            len(a) == len(b) and all(x is y and v == w for (x, v), (y, w) in zip(a, b, strict=True))
            for a, b in ((sums, sums_now), (weights, weights_now))
        )
    )


class GenerativeAdapter:
    """A frozen causal LM plus a generator that turns contexts into adapters in one forward pass."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        generator: AdapterGenerator,
        base_name: str,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.generator = generator.to(model.device)
        self.base_name = base_name
        self.injector = AdapterInjector(model, self.generator)
        self.refresh_fingerprint()

    @classmethod
    def from_pretrained(
        cls,
        base: str | None = None,
        generator: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        config: GeneratorConfig | None = None,
        overrides: dict | None = None,
    ) -> GenerativeAdapter:
        """Load a base LM (default: embedded SmolLM2) and a generator directory.

        Without `generator`, the embedded model gets the generator shipped with the package; any other
        base gets an *untrained* generator (zero B: the adapter changes nothing) and a loud warning.
        `overrides` changes config fields of a loaded generator that no weight depends on, e.g.
        `{"memory_layers": 0}` switches off the next-token memory the shipped generator uses, `{"memory_scale": 4.0}`
        weakens it (docs/design.md, "Next-token memory").
        """
        base_name, model, tokenizer = load_base(base, dtype=dtype, device=device)
        if (
            generator is None
            and base_name == EMBEDDED_MODEL
            and (SHIPPED_GENERATOR / "generator.safetensors").is_file()
        ):
            generator = SHIPPED_GENERATOR
        if generator is not None:
            gen = AdapterGenerator.load(generator, model, overrides)
        else:
            log.warning(
                "UNTRAINED GENERATOR: no trained generator for %s; adapters will not change the model's answers",
                base_name,
            )
            gen = AdapterGenerator.for_model(model, config or GeneratorConfig(base_model=base_name))
        return cls(model, tokenizer, gen, base_name)

    @property
    def config(self) -> GeneratorConfig:
        return self.generator.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def refresh_fingerprint(self) -> str:
        """Recompute the generator hash (call after changing its weights, e.g. in training)."""
        self.fingerprint = self.generator.fingerprint()
        return self.fingerprint

    # ---- contexts -> states -------------------------------------------------------------------

    def tokenize_context(self, context: Context) -> list[list[int]]:
        """Documents as token-id lists: a str, a list of str (one document each), or token ids."""
        if isinstance(context, Tensor):
            context = context.tolist()
        if isinstance(context, str):
            docs = [context]
        elif isinstance(context, Sequence) and all(isinstance(d, str) for d in context):
            docs = list(context)
        elif isinstance(context, Sequence) and all(isinstance(t, int) for t in context):
            return [list(context)] if context else []
        else:
            raise GenAdapterError("context must be a string, a list of strings or a list of token ids")
        docs = [d for d in docs if d.strip()]
        if not docs:
            return []
        return [ids for ids in self.tokenizer(docs, add_special_tokens=False)["input_ids"] if ids]

    def chunk(self, documents: list[list[int]]) -> list[list[int]]:
        """Split each document into chunks of at most w tokens; chunks never cross documents. With the config's
        context_bos each document starts with the BOS token; with chunk_split "even" a document of n tokens becomes
        ceil(n / w) chunks of ceil(n / ceil(n / w)) tokens, the last one shorter (the authors' windows)."""
        if self.config.context_bos:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise GenAdapterError("this generator starts contexts with a BOS token, and the tokenizer has none")
            documents = [[bos, *doc] for doc in documents]
        chunks = []
        for doc in documents:
            w = self.config.chunk_size
            if self.config.chunk_split == "even" and len(doc) > w:
                pieces = -(-len(doc) // w)  # ceil(n / w)
                w = -(-len(doc) // pieces)
            chunks += [doc[i : i + w] for i in range(0, len(doc), w)]
        return chunks

    def pad(self, sequences: Sequence[Sequence[int]], side: str = "right") -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), both (N, T_max)."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
            ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, span] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_chunks(
        self, chunks: Sequence[Sequence[int]], adapters: dict[str, Tensor] | None = None
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Frozen-LM hidden states of independently encoded chunks (positions restart at 0), or with `adapters`
        (as `batch_adapters` gives them) those of the LM so adapted: chunk_mode "sequential".

        Returns (hidden_states, mask): hidden_states[l] (N, T, d) enters decoder layer l."""
        ids, mask = self.pad(chunks)
        with self.injector.activate(adapters):
            out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return out.hidden_states, mask

    def encode_chunks_with_memory(
        self,
        chunks: Sequence[Sequence[int]],
        owner: Tensor | None = None,
        rows: int | None = None,
        adapters: dict[str, Tensor] | None = None,
    ) -> tuple[tuple[Tensor, ...], Tensor, dict[str, Tensor]]:
        """encode_chunks, plus the chunks' next-token memory sums ({} when the generator has no memory): all in one
        sum, or chunk n into row owner[n] of `rows` sums."""
        memory = self.generator.memory
        if memory is None:
            return (*self.encode_chunks(chunks, adapters), {})
        sums = memory.empty_sums(rows, self.device)
        with memory.capturing(self.model) as keys:
            hidden, mask = self.encode_chunks(chunks, adapters)
        targets = memory.targets(self.model.get_output_embeddings(), self.pad(chunks)[0], hidden[-1])
        memory.write(keys, targets, mask, sums, owner)
        return hidden, mask, sums

    def empty_state(self) -> ContextState:
        memory = self.generator.memory.empty_sums() if self.generator.memory is not None else {}
        return ContextState(
            sums=self.generator.empty_sums() | memory,
            num_tokens=0,
            base_model=self.base_name,
            generator_fingerprint=self.fingerprint,
            generator_config=self.config.to_dict(),
        )

    def absorb(self, context: Context, batch_size: int = 8, progress: bool | None = None) -> ContextState:
        """Turn a context into a state in one frozen forward per batch of chunks (O(batch) memory). In chunk_mode
        "sequential" the chunks are read in order, one per forward, each by the LM adapted with the state of those
        before it (batch_size is then unused): O(1) memory for a context of any length."""
        *_, state = self.absorb_steps(context, batch_size, progress)  # one state object, yielded after each forward
        return state

    @torch.no_grad()
    def absorb_steps(
        self, context: Context, batch_size: int = 8, progress: bool | None = False
    ) -> Iterator[ContextState]:
        """`absorb`, one forward at a time: yields the state so far after each forward (one object, growing); the
        last one is the context's state. Other model work may run between two forwards (the server's chats do)."""
        if batch_size < 1:
            raise GenAdapterError("batch_size must be at least 1")
        chunks = self.chunk(self.tokenize_context(context))
        if not chunks:
            raise GenAdapterError("the context is empty: nothing to absorb")
        state = self.empty_state()
        sequential = self.config.chunk_mode == "sequential"
        starts = range(0, len(chunks), 1 if sequential else batch_size)
        show = len(starts) > 1 if progress is None else progress
        for start in tqdm(starts, desc="absorbing", unit="chunk" if sequential else "batch", disable=not show):
            batch = chunks[start : start + (1 if sequential else batch_size)]
            adapters = self.batch_adapters(state, 1) if sequential and state.num_tokens else None
            hidden, mask, memory_sums = self.encode_chunks_with_memory(batch, adapters=adapters)
            for name, total in memory_sums.items():
                state.sums[name] += total.cpu()
            for name, per_chunk in self.generator.chunk_states(hidden, mask).items():
                state.sums[name] += per_chunk.sum(0).cpu()
            state.num_tokens += sum(len(c) for c in batch)
            yield state

    @torch.no_grad()
    def calibrate_memory(
        self, texts: str | Sequence[str], max_tokens: int = 16384, batch_size: int = 8, progress: bool | None = None
    ) -> int:
        """Measure Σ, the mean k kᵀ of the memory keys over `texts` (ordinary text, not a context to absorb), which
        memory_background weighs in the memory solve; chunks are read in order until `max_tokens` (texts past that
        are not even tokenized). Returns the number of tokens read. The generator's fingerprint changes with Σ,
        so states made before do not mix."""
        memory = self.generator.memory
        if memory is None or not self.config.memory_background:
            raise GenAdapterError(
                "calibrate_memory needs a generator with the next-token memory and memory_background > 0"
            )
        if max_tokens < 1 or batch_size < 1:
            raise GenAdapterError("max_tokens and batch_size must be at least 1")
        chunks, total = [], 0
        for text in [texts] if isinstance(texts, str) else texts:
            for chunk in self.chunk(self.tokenize_context(text)):
                if total < max_tokens:
                    chunks.append(chunk[: max_tokens - total])
                    total += len(chunks[-1])
            if total == max_tokens:
                break
        if not chunks:
            raise GenAdapterError("calibrate_memory got no text")
        starts = range(0, len(chunks), batch_size)
        show = len(starts) > 1 if progress is None else progress
        batches = (chunks[start : start + batch_size] for start in starts)
        progress_bar = tqdm(batches, total=len(starts), desc="calibrating memory", unit="batch", disable=not show)
        memory.calibrate(self.model, lambda batch: self.encode_chunks(batch)[1], progress_bar, total)
        self.refresh_fingerprint()
        return total

    # ---- states -> adapters -------------------------------------------------------------------

    def check_state(self, state: ContextState) -> None:
        if state.generator_fingerprint != self.fingerprint or state.base_model != self.base_name:
            raise IncompatibleStateError(
                f"state was made by generator {state.generator_fingerprint} on {state.base_model}; "
                f"this is generator {self.fingerprint} on {self.base_name}"
            )

    def adapter_factors(self, state: ContextState) -> dict[str, Tensor]:
        """What the injector applies for a state: the normalised S~ per module (R1, R2), plus the next-token memory maps
        (d_out, k) when the generator has the memory. Kept on the state and reused until its sums, its token count
        or the generator change (an SVD per module and a solve per memory module: 0.14 s for the shipped generator
        on a 2-core CPU, more than a forward over a short prompt). Treat the tensors as read-only."""
        self.check_state(state)
        basis = (
            state.num_tokens,
            str(self.device),
            [(t, t._version) for t in state.sums.values()],
            [(t, t._version) for t in (*self.generator.parameters(), *self.generator.buffers())],
        )
        cached = state.cached_factors
        if cached is not None and _same_basis(cached[0], basis):
            return dict(cached[1])
        sums = {k: v.to(self.device) for k, v in state.sums.items()}
        with torch.no_grad():
            factors = self.generator.adapters(sums, state.num_tokens)
        state.cached_factors = (basis, factors)
        return dict(factors)

    def batch_adapters(self, states: StateArg, batch: int) -> dict[str, Tensor] | None:
        """Stack per-row normalised states to (N, R1, R2); None rows get no adapter (zeros)."""
        if states is None:
            return None
        if isinstance(states, ContextState):
            return {k: v.unsqueeze(0) for k, v in self.adapter_factors(states).items()}
        if len(states) != batch:
            raise GenAdapterError(f"got {len(states)} states for {batch} prompts")
        rows = [self.adapter_factors(s) if s is not None else None for s in states]
        template = next((row for row in rows if row is not None), None) or self.adapter_factors(self.empty_state())
        return {
            key: torch.stack([row[key] if row is not None else torch.zeros_like(value) for row in rows])
            for key, value in template.items()
        }

    @staticmethod
    def single_state(states: StateArg) -> ContextState | None:
        """The state when one state serves every row (a state, or a list of the very same state), else None."""
        if isinstance(states, ContextState):
            return states
        if states and states[0] is not None and all(s is states[0] for s in states):
            return states[0]
        return None

    @contextmanager
    def adapted(self, states: StateArg, batch: int = 1, merge: bool = False) -> Iterator[None]:
        """Run the LM with one adapter for all rows, or one per row, inside the block. With `merge`, a single state
        is written into the weights for the block (closed-book cost per token; writing it costs
        2 · Σ d_out · d_in · rank FLOPs, see docs/benchmarks.md) and the original weights come back afterwards."""
        single = self.single_state(states) if merge else None
        if single is not None and not self.injector.is_merged:
            if not isinstance(states, ContextState) and len(states) != batch:
                raise GenAdapterError(f"got {len(states)} states for {batch} prompts")
            with self.merged(single):
                yield
            return
        with self.injector.activate(self.batch_adapters(states, batch)):
            yield

    def merge(self, state: ContextState) -> None:
        """Write the adapter into the weights: zero overhead until unmerge()."""
        self.injector.merge(self.adapter_factors(state))

    def unmerge(self) -> None:
        """Restore the exact original weights."""
        self.injector.unmerge()

    @contextmanager
    def merged(self, state: ContextState) -> Iterator[None]:
        self.merge(state)
        try:
            yield
        finally:
            self.unmerge()

    # ---- prompting ----------------------------------------------------------------------------

    def format_prompt(self, prompt: str, chat: bool = True) -> str:
        """The prompt as the model sees it: in its chat template when it has one."""
        if chat and self.tokenizer.chat_template:
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt

    def _as_batch(self, prompts: str | Sequence[str]) -> tuple[list[str], bool]:
        if isinstance(prompts, str):
            return [prompts], True
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise GenAdapterError("prompts must be a string or a non-empty list of strings")
        return list(prompts), False

    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        state: StateArg = None,
        max_new_tokens: int = 64,
        chat: bool = True,
        merge: bool | None = None,
        **generate_kwargs,
    ) -> str | list[str]:
        """Greedy (by default) answers; a list of states gives each prompt its own adapter. `merge` writes a state
        that serves every prompt into the weights while generating; by default (None) it does so when at least
        MERGE_MIN_NEW_TOKENS tokens may be generated, where the per-token saving outweighs the cost of merging."""
        batch, single = self._as_batch(prompts)
        encoded = [self.tokenizer(self.format_prompt(p, chat), add_special_tokens=False)["input_ids"] for p in batch]
        ids, mask = self.pad(encoded, side="left")
        generate_kwargs.setdefault("do_sample", False)
        if merge is None:
            merge = max_new_tokens >= MERGE_MIN_NEW_TOKENS
        with self.adapted(state, len(batch), merge=merge):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **generate_kwargs,
            )
        answers = [a.strip() for a in self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
        return answers[0] if single else answers

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None, state: StateArg = None) -> Tensor:
        """Next-token logits (N, T, vocab) of the adapted LM."""
        with self.adapted(state, input_ids.shape[0]):
            return self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask).logits

    @torch.no_grad()
    def score(
        self,
        prompts: str | Sequence[str],
        continuations: str | Sequence[str],
        state: StateArg = None,
        chat: bool = True,
    ) -> list[float]:
        """Sum of log-probabilities of each continuation after its (formatted) prompt."""
        batch, _ = self._as_batch(prompts)
        conts, _ = self._as_batch(continuations)
        if len(batch) != len(conts):
            raise GenAdapterError(f"got {len(batch)} prompts and {len(conts)} continuations")
        heads = [self.tokenizer(self.format_prompt(p, chat), add_special_tokens=False)["input_ids"] for p in batch]
        tails = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
        ids, mask = self.pad([h + t for h, t in zip(heads, tails, strict=True)])
        logprobs = self.logits(ids, mask, state).float().log_softmax(-1)
        scores = []
        for row, (head, tail) in enumerate(zip(heads, tails, strict=True)):
            positions = torch.arange(len(head) - 1, len(head) + len(tail) - 1, device=self.device)
            targets = ids[row, len(head) : len(head) + len(tail)]
            scores.append(logprobs[row, positions, targets].sum().item())
        return scores

    # ---- export -------------------------------------------------------------------------------

    def peft_files(self, state: ContextState) -> dict[str, bytes]:
        """The adapter as the files of a standard PEFT LoRA directory (adapter_config.json and
        adapter_model.safetensors, in memory): rank r (scale folded into lora_B), and for modules holding the
        next-token memory r + k, its factors stacked under the generator's (`rank_pattern`)."""
        from peft import LoraConfig

        rank, scale = self.generator.export_rank(), self.config.scale
        adapters, weights, ranks = self.adapter_factors(state), {}, {}
        for name in self.generator.module_names:
            lora_a, lora_b = self.generator.block(name).lora_factors(adapters[name], rank, scale)
            lora_b = scale * lora_b
            memory_map = adapters.get(memory_key(name, "map"))
            if memory_map is not None:
                memory_a, memory_b = self.generator.memory.lora_factors(name, memory_map)
                lora_a, lora_b = torch.cat([lora_a, memory_a]), torch.cat([lora_b, memory_b], dim=1)
                ranks[name] = lora_a.shape[0]
            weights[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous().cpu()
            weights[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous().cpu()
        lora_config = LoraConfig(
            r=rank,
            lora_alpha=rank,  # scaling 1: the scale is in lora_B
            rank_pattern={re.escape(name): r for name, r in ranks.items()},  # PEFT matches (.*\.)?(key)$
            alpha_pattern={re.escape(name): r for name, r in ranks.items()},
            target_modules=list(self.config.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.base_name,
        )
        config = {k: list(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}  # as PEFT saves
        return {
            "adapter_config.json": json.dumps(config, indent=2, sort_keys=True).encode(),
            "adapter_model.safetensors": save_safetensors(weights, metadata={"format": "pt"}),
        }

    def export_peft(self, state: ContextState, directory: str | Path) -> None:
        """Write `peft_files` as a directory that PEFT's `PeftModel.from_pretrained` loads."""
        files = self.peft_files(state)

        def write(tmp: Path) -> None:
            for name, data in files.items():
                (tmp / name).write_bytes(data)

        write_dir_atomic(directory, write, marker=PEFT_MARKER)
