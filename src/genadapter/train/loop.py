"""The training loop shared by both recipes: AdamW, warm-up + cosine, clipping, NaN guard, JSONL log,
time-based resumable checkpoints, held-out metrics. One process on CPU; `accelerate launch` for DDP."""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..adapter import GenerativeAdapter
from ..base_model import load_base
from ..data import HELDOUT_SEED, split_wiki
from ..errors import GenAdapterError
from ..generator import AdapterGenerator
from ..metrics import token_f1
from .config import TrainConfig
from .data import (
    Example,
    TokenStream,
    counterfactual_examples,
    fact_examples,
    group_by_context,
    instruction_examples,
    pretrain_documents,
    wiki_examples,
)
from .facts import FactRandom, OpenValues
from .objectives import instruct_losses, pretrain_losses


class TrainingError(GenAdapterError):
    """Training cannot go on (e.g. the loss became NaN)."""


class GeneratorTrainer(nn.Module):
    """Wraps the generator so one training step is a module forward (what DDP needs to sync gradients)."""

    def __init__(self, ga: GenerativeAdapter, config: TrainConfig):
        super().__init__()
        self.generator = ga.generator
        self.ga, self.config = ga, config  # ga is not an nn.Module: the frozen LM is not registered

    def forward(self, kind: str, batch, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        if kind == "pretrain":
            return pretrain_losses(self.ga, batch, self.config, rng)
        return instruct_losses(self.ga, batch, self.config)


def lr_factor(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to 10% over the steps — or over the time box, if that runs out first."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.max_minutes:
        progress = max(progress, elapsed_s / (60 * config.max_minutes))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_adapter(config: TrainConfig, device: torch.device) -> GenerativeAdapter:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if config.base_dtype not in dtypes:
        raise TrainingError(f"base_dtype must be one of {', '.join(dtypes)}, got {config.base_dtype!r}")
    base_name, model, tokenizer = load_base(config.base, dtype=dtypes[config.base_dtype], device=str(device))
    if config.init_generator:
        generator = AdapterGenerator.load(config.init_generator, model, config.generator_overrides)
    else:
        config.generator.base_model = base_name
        generator = AdapterGenerator.for_model(model, config.generator)
    if generator.config.chunk_mode != "independent":
        raise TrainingError(
            f"training and held-out scoring encode a context's chunks independently, and this generator's chunk_mode "
            f"is {generator.config.chunk_mode!r}: set generator_overrides {{'chunk_mode': 'independent'}} to train "
            "it that way (not how the authors trained it)"
        )
    return GenerativeAdapter(model, tokenizer, generator, base_name)


def with_other_contexts(questions: list[Example]) -> list[Example]:
    """Each question with the next distinct context of the list (cyclically), never its own: the control."""
    contexts = [group[0].context for group in group_by_context(questions)]
    if len(contexts) < 2:
        raise ValueError("the held-out control needs questions about at least 2 different texts")
    return [replace(ex, context=contexts[(contexts.index(ex.context) + 1) % len(contexts)]) for ex in questions]


class HeldOut:
    """Fixed held-out Wikipedia sequences (losses), questions (answer NLL, cloze F1) and synthetic fact questions
    (NLL, F1), independent of the run seed. Every loss is measured three ways: with the adapter of the text itself, with
    the adapter of *another* held-out text (the control: a gain there is generic — style, domain — not knowledge
    of the context) and with no adapter. The fact questions have answers nothing but the context gives, so their
    gap between "adapter" and "other_context" is the plainest measure of what the adapter stores; the
    counterfactual questions (held-out leads with swapped names and numbers) measure the same on real prose."""

    def __init__(self, ga: GenerativeAdapter, config: TrainConfig, fact_f1_items: int = 16):
        if fact_f1_items < 1:
            raise GenAdapterError("fact_f1_items must be at least 1")
        train_leads, leads = split_wiki(config.heldout_docs)
        stream = TokenStream([f"{t}\n{x}" for t, x in leads], ga.tokenizer)
        rng = np.random.default_rng(HELDOUT_SEED)
        self.sequences = stream.sample(rng, config.num_chunks * ga.config.chunk_size, config.eval_sequences)
        self.other_sequences = self.sequences[1:] + self.sequences[:1]
        questions = wiki_examples(leads, random.Random(HELDOUT_SEED))
        self.cloze = [ex for ex in questions if ex.task == "wiki-cloze"][:8]
        # every question type; answer NLL is far less noisy than F1 on 8 items
        # a longer draw keeps the first 32 (the NLL set) and makes the greedy F1 less noisy than on 16 items
        facts = fact_examples(random.Random(HELDOUT_SEED), max(32, fact_f1_items))
        # real prose, invented names and numbers: what the adapter stores of text unlike the fact paragraphs
        counterfactual = counterfactual_examples(leads, random.Random(HELDOUT_SEED))
        # values never used in training (the held-out half of OpenValues), asked only where the answer holds one:
        # an adapter that picks among values it was trained on cannot answer these, only one that copies
        values = OpenValues.from_leads(train_leads, heldout=True)
        draw = fact_examples(FactRandom(HELDOUT_SEED, values), 4 * max(32, fact_f1_items))
        open_facts = [ex for ex in draw if values.holds_value(ex.answer)]
        self.questions = {
            "qa": questions[:32],
            "facts": facts[:32],
            "facts_open": open_facts[:32],
            "counterfactual": counterfactual[:32],
        }
        self.other_questions = {name: with_other_contexts(qs) for name, qs in self.questions.items()}
        self.fact_f1 = (facts[:fact_f1_items], with_other_contexts(facts)[:fact_f1_items])
        self.open_fact_f1 = (open_facts[:fact_f1_items], with_other_contexts(open_facts)[:fact_f1_items])
        self.counterfactual_f1 = (counterfactual[:16], with_other_contexts(counterfactual)[:16])
        # both tasks and the answer loss whatever the run trains, so every run is scored the same way
        self.config = replace(config, objective="answer", completion=True, reconstruction=True)

    @torch.no_grad()
    def evaluate(self, ga: GenerativeAdapter) -> dict[str, float]:
        metrics: dict[str, float] = {}
        conditions = (
            ("adapter", True, self.sequences, self.questions),
            ("other_context", True, self.other_sequences, self.other_questions),
            ("base", False, self.sequences, self.questions),
        )
        for suffix, with_adapter, sources, questions in conditions:
            totals: dict[str, list[float]] = {}
            for seq, source in zip(self.sequences, sources, strict=True):
                rng = np.random.default_rng(HELDOUT_SEED)
                for task, loss in pretrain_losses(ga, [seq], self.config, rng, with_adapter, [source]).items():
                    totals.setdefault(task, []).append(loss.item())
            metrics.update({f"{task}_{suffix}": float(np.mean(totals[task])) for task in totals if task != "loss"})
            for name, items in questions.items():
                nll = [
                    instruct_losses(ga, items[i : i + 8], self.config, with_adapter)["answer"].item()
                    for i in range(0, len(items), 8)
                ]
                metrics[f"{name}_nll_{suffix}"] = float(np.mean(nll))
        greedy = {  # the other-context questions keep their gold answer, so F1 there is the control
            "cloze_f1_adapter": self.cloze,
            "facts_f1_adapter": self.fact_f1[0],
            "facts_f1_other_context": self.fact_f1[1],
            "facts_open_f1_adapter": self.open_fact_f1[0],
            "facts_open_f1_other_context": self.open_fact_f1[1],
            "counterfactual_f1_adapter": self.counterfactual_f1[0],
            "counterfactual_f1_other_context": self.counterfactual_f1[1],
        }
        for key, items in greedy.items():
            f1s = [
                token_f1(
                    ga.generate(ex.prompt, state=ga.absorb(ex.context, progress=False), max_new_tokens=10), [ex.answer]
                )
                for ex in items
            ]
            metrics[key] = 100 * float(np.mean(f1s))
        return metrics


def batch_kind(config: TrainConfig, step: int) -> str:
    """'pretrain' or 'instruct': which batch step `step` trains on (every pretrain_every-th is a pretraining one)."""
    if config.recipe == "pretrain" or (
        config.pretrain_every and step % config.pretrain_every == config.pretrain_every - 1
    ):
        return "pretrain"
    return "instruct"


def pretrain_sequence_tokens(config: TrainConfig) -> int:
    """Length of one pretraining sequence: `num_chunks` chunks of the generator's chunk size."""
    return config.num_chunks * config.generator.chunk_size


def step_tokens(config: TrainConfig, step: int) -> int:
    """Nominal training tokens of step `step`: a pretraining batch's whole sequences, an instruction batch's contexts
    at their cap. A function of the step alone, so the count (a scaling curve's x-axis) survives a resume."""
    if batch_kind(config, step) == "pretrain":
        return config.batch_size * pretrain_sequence_tokens(config)
    return config.batch_size * config.max_context_tokens


def tokens_through(config: TrainConfig, steps: int) -> int:
    """Nominal training tokens of the first `steps` steps."""
    return sum(step_tokens(config, step) for step in range(steps))


def _batch(config: TrainConfig, step: int, rank: int, stream, examples):
    rng = np.random.default_rng([config.seed, step, rank])
    if batch_kind(config, step) == "pretrain":
        return "pretrain", stream.sample(rng, pretrain_sequence_tokens(config), config.batch_size), rng
    picks = rng.integers(0, len(examples), size=config.batch_size)
    return "instruct", [examples[i] for i in picks], rng


def forward_backward(
    accelerator: Accelerator,
    trainer: nn.Module,
    kind: str,
    batch: list,
    rng: np.random.Generator,
    micro_batch_size: int,
) -> dict[str, torch.Tensor]:
    """Losses (detached) and gradients of one step's batch, run `micro_batch_size` items at a time (0 = all at
    once). Every loss is a mean over the batch's items, so micro-batch losses weighted by their share of the batch
    sum to the whole batch's loss and their gradients to its gradient, at a fraction of the activation memory (one
    pretraining step at batch 8: +12.4 GiB in one piece, +2.5 GiB one sequence at a time; bench/micro_batch.py).
    DDP syncs gradients on the last micro-batch only."""
    size = micro_batch_size or len(batch)
    parts = [batch[start : start + size] for start in range(0, len(batch), size)]
    total: dict[str, torch.Tensor] = {}
    for index, part in enumerate(parts):
        weight = len(part) / len(batch)
        with nullcontext() if index == len(parts) - 1 else accelerator.no_sync(trainer):
            with accelerator.autocast():
                losses = trainer(kind, part, rng)
            accelerator.backward(weight * losses["loss"])
        for key, value in losses.items():
            total[key] = total.get(key, 0.0) + weight * value.detach()
    return total


def _save_checkpoint(path: Path, generator, optimizer, step: int, elapsed_s: float, config: TrainConfig) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "generator": generator.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "elapsed_s": elapsed_s,
            "config": config.to_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16/AMX); otherwise it emulates it, far slower than fp32."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def train(config: TrainConfig) -> Path:
    """Run (or resume) a recipe; returns the directory of the final generator."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_cpu = not torch.cuda.is_available()
    if config.bf16 and on_cpu and not cpu_has_native_bf16():
        warnings.warn(
            "bf16 autocast on a CPU without native bf16 is emulated and far slower than fp32 (a matmul ran ~67x "
            "slower on an AVX2-only VM); set bf16 to false",
            stacklevel=2,
        )
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=on_cpu)
    torch.manual_seed(config.seed)
    ga = build_adapter(config, accelerator.device)
    config.generator = ga.config
    if accelerator.is_main_process:
        config.save(out / "train_config.json")
    ga.generator.requires_grad_(True).train()
    documents = pretrain_documents(config.heldout_docs, config.max_documents)
    stream = TokenStream(documents, ga.tokenizer)
    examples = (
        instruction_examples(config.heldout_docs, config.seed, config.sources, config.facts, config.open_fact_values)
        if config.recipe == "instruct"
        else []
    )
    heldout = HeldOut(ga, config)

    trainer = GeneratorTrainer(ga, config)
    optimizer = torch.optim.AdamW(ga.generator.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = out / "checkpoint.pt"
    start, elapsed_before = 0, 0.0  # steps and seconds of training already done (a resumed run)
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location=accelerator.device, weights_only=False)
        ga.generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        accelerator.print(f"resuming from step {start} ({checkpoint})")
    elif ga.config.memory_background and not ga.generator.memory.calibrated:
        # Σ comes from the frozen LM's activations alone: measured once before the first step, then kept in the
        # checkpoints (a resumed run loads it above instead of measuring it again).
        ga.calibrate_memory(documents, config.calibration_tokens, progress=accelerator.is_main_process)
    trainer, optimizer = accelerator.prepare(trainer, optimizer)
    log = (out / "log.jsonl").open("a") if accelerator.is_main_process else None

    def write(record: dict) -> None:
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    run_tokens = tokens_through(config, config.steps)
    unreachable = [m for m in config.milestone_tokens if m > run_tokens]
    if unreachable:
        raise TrainingError(
            f"milestone_tokens {unreachable} lie beyond the run's {run_tokens} tokens ({config.steps} steps); "
            "raise steps or drop them"
        )
    last_save, started = time.monotonic(), time.monotonic()
    seen = resumed_tokens = tokens_through(config, start)

    def elapsed_s() -> float:  # training time of the whole run, across resumes: what the time box counts
        return elapsed_before + time.monotonic() - started

    # The step never waits for the device: losses and gradient norms stay there until a log line, an evaluation or a
    # checkpoint moves them to the host in one transfer (check_steps), which also stops at a non-finite one.
    pending: list[tuple[int, str, dict[str, torch.Tensor]]] = []  # (step, kind, losses) not yet on the host
    window: list[tuple[str, dict[str, float]]] = []  # (kind, losses) of the steps since the last log line

    def check_steps() -> None:
        window.extend(host_losses(pending, checkpoint))
        pending.clear()

    progress = tqdm(
        range(start, config.steps),
        initial=start,
        total=config.steps,
        desc=config.recipe,
        disable=not accelerator.is_main_process,
    )
    done = start
    for step in progress:
        if config.max_minutes and time_box_reached(accelerator, config, step - start, elapsed_s()):
            accelerator.print(f"time box of {config.max_minutes} min reached after {step} steps")
            break
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(config, step, elapsed_s())
        kind, batch, rng = _batch(config, step, accelerator.process_index, stream, examples)
        losses = forward_backward(accelerator, trainer, kind, batch, rng, config.micro_batch_size)
        grad_norm = accelerator.clip_grad_norm_(ga.generator.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done, before, seen = step + 1, seen, seen + step_tokens(config, step)
        pending.append((step, kind, {"grad_norm": grad_norm, **losses}))
        if (step + 1) % config.log_every == 0:
            check_steps()
            progress.set_postfix(loss=f"{window[-1][1]['loss']:.3f}")
            write(
                {
                    "step": step + 1,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_seen": seen,
                    "tokens_per_s": (seen - resumed_tokens) / (time.monotonic() - started),
                    "elapsed_s": elapsed_s(),
                    **window_means(window),
                }
            )
            window.clear()
        if accelerator.is_main_process and (step + 1) % config.eval_every == 0:
            check_steps()
            ga.generator.eval()
            write({"step": step + 1, "eval": heldout.evaluate(ga)})
            ga.generator.train()
        reached = [m for m in config.milestone_tokens if before < m <= seen]
        if accelerator.is_main_process and reached:
            check_steps()
            # the milestone's copy before the checkpoint past it: a crash in between re-runs the milestone
            metrics = keep_milestones(ga, config, heldout, reached, done, seen)
            write({"step": done, "tokens_seen": seen, "milestones": reached, "eval": metrics})
            _save_checkpoint(checkpoint, ga.generator, optimizer, done, elapsed_s(), config)
            last_save = time.monotonic()
        if accelerator.is_main_process and time.monotonic() - last_save > 60 * config.checkpoint_minutes:
            check_steps()
            _save_checkpoint(checkpoint, ga.generator, optimizer, step + 1, elapsed_s(), config)
            last_save = time.monotonic()
    check_steps()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out / "generator"
    trained_s = elapsed_s()  # before the final evaluation, which is not training time
    _save_checkpoint(checkpoint, ga.generator, optimizer, done, trained_s, config)
    metrics = finalize(ga, config, heldout)
    write({"step": done, "elapsed_s": trained_s, "final_eval": metrics})
    accelerator.print(json.dumps(metrics, indent=2))
    return out / "generator"


def host_losses(
    pending: list[tuple[int, str, dict[str, torch.Tensor]]], checkpoint: Path
) -> list[tuple[str, dict[str, float]]]:
    """(kind, losses) of the pending steps as floats, moved to the host in one transfer, or TrainingError at the first
    step whose loss or gradient norm is not finite (its update already ran; the caller checks before every
    checkpoint, so the last checkpoint predates it)."""
    if not pending:
        return []
    flat = torch.stack([value.detach().float().reshape(()) for _, _, losses in pending for value in losses.values()])
    values, out = iter(flat.tolist()), []
    for step, kind, losses in pending:
        host = {key: next(values) for key in losses}
        if not math.isfinite(host["loss"]):
            raise TrainingError(
                f"loss is {host['loss']} at step {step}; the last checkpoint ({checkpoint}) is intact — "
                "lower lr or grad_clip and resume"
            )
        if not math.isfinite(host["grad_norm"]):
            raise TrainingError(
                f"gradient norm is {host['grad_norm']} at step {step}; checkpoint {checkpoint} is intact"
            )
        out.append((kind, host))
    return out


def time_box_reached(accelerator: Accelerator, config: TrainConfig, steps_run: int, elapsed_s: float) -> bool:
    """Whether the run's time box is spent, by the host clock. With several processes they must stop at the same
    step: they agree through one all-reduce every log_every steps instead of every step (it waits for the device)."""
    reached = elapsed_s >= 60 * config.max_minutes
    if accelerator.num_processes == 1:
        return reached
    if reached:
        accelerator.set_trigger()
    return steps_run % config.log_every == 0 and accelerator.check_trigger()


def window_means(window: list[tuple[str, dict[str, float]]]) -> dict[str, float]:
    """Means over the steps since the last log line: overall loss and grad norm, and each loss per step kind
    ("pretrain.completion", "instruct.answer", ...). A single step would show only one kind: with
    pretrain_every dividing log_every, it would always be a pretraining step."""
    means = {key: float(np.mean([values[key] for _, values in window])) for key in ("loss", "grad_norm")}
    for kind in sorted({k for k, _ in window}):
        rows = [values for k, values in window if k == kind]
        for key in rows[0]:
            if key != "grad_norm":
                means[f"{kind}.{key}"] = float(np.mean([values[key] for values in rows]))
    return means


def finalize(
    ga: GenerativeAdapter,
    config: TrainConfig,
    heldout: HeldOut | None = None,
    directories: Sequence[Path] = (),
    record: dict | None = None,
) -> dict[str, float]:
    """Write the generator directory (weights, configs, then the held-out metrics plus `record`'s fields) to each of
    `directories` (default: output_dir/generator). The weights go first: the scoring can take many minutes, and a
    run stopped during it keeps its generator; heldout_metrics.json is written last, as the mark of a finished one."""
    ga.generator.eval()
    directories = list(directories) or [Path(config.output_dir) / "generator"]
    for directory in directories:
        ga.generator.save(directory, dtype=getattr(torch, config.save_dtype))
        config.save(directory / "train_config.json")
    metrics = (heldout or HeldOut(ga, config)).evaluate(ga)
    for directory in directories:
        (directory / "heldout_metrics.json").write_text(json.dumps({**metrics, **(record or {})}, indent=2) + "\n")
    return metrics


def keep_milestones(
    ga: GenerativeAdapter, config: TrainConfig, heldout: HeldOut, milestones: list[int], step: int, seen: int
) -> dict[str, float]:
    """Write output_dir/milestones/<m>/ for each milestone `m` this step reached (one evaluation for all)."""
    root = Path(config.output_dir) / "milestones"
    directories = [root / str(m) for m in milestones]
    metrics = finalize(ga, config, heldout, directories, {"step": step, "tokens_seen": seen})
    ga.generator.train()
    return metrics


def evaluate_generator(
    generator_dir: str | Path, fact_f1_items: int = 16, overrides: dict | None = None
) -> dict[str, float]:
    """Held-out metrics of a finished generator directory (e.g. to compare a new run with the shipped one), with
    `overrides` of its config (e.g. {"memory_layers": 0}: the memory off). The directory's generator_config.json says
    what the generator is: the training run's `generator_overrides` are already in it, or were changed after training
    (the shipped memory strength), so they are not applied again."""
    generator_dir = Path(generator_dir)
    saved = generator_dir / "train_config.json"
    values = json.loads(saved.read_text()) if saved.is_file() else {}
    recorded_base = json.loads((generator_dir / "generator_config.json").read_text()).get("base_model")
    base = values.get("base") or recorded_base
    values = {**values, "base": base, "init_generator": str(generator_dir), "generator_overrides": overrides or {}}
    config = TrainConfig(**values)
    ga = build_adapter(config, torch.device("cpu"))
    ga.generator.eval()
    return HeldOut(ga, config, fact_f1_items).evaluate(ga)


def finalize_checkpoint(run_dir: str | Path) -> dict[str, float]:
    """Turn the latest checkpoint of a (possibly still running or killed) run into a generator directory."""
    run_dir = Path(run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.is_file():
        raise TrainingError(f"{run_dir} has no checkpoint.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    # the checkpoint's config.generator is the generator as trained, overrides applied: rebuild exactly that
    values = {**state["config"], "output_dir": str(run_dir), "init_generator": None, "generator_overrides": {}}
    config = TrainConfig(**values)
    ga = build_adapter(config, torch.device("cpu"))
    ga.generator.load_state_dict(state["generator"])
    return finalize(ga, config, record={"step": state["step"]})
