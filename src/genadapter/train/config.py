"""Typed training configuration; saved as JSON next to every checkpoint and result."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..config import OVERRIDABLE, GeneratorConfig, check_overrides
from ..data import HELDOUT_WIKI_LEADS
from ..errors import GenAdapterError

RECIPES = ("pretrain", "instruct")
OBJECTIVES = ("answer", "distill", "mix")


@dataclass
class TrainConfig:
    recipe: str = field(default="pretrain", metadata={"help": "'pretrain' (reconstruction+completion) or 'instruct'."})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "Checkpoints, logs and the final generator."})
    base: str | None = field(default=None, metadata={"help": "Base LM (default: embedded SmolLM2)."})
    init_generator: str | None = field(
        default=None, metadata={"help": "Start from this generator directory (e.g. the pretrained one)."}
    )
    generator: GeneratorConfig = field(
        default_factory=lambda: GeneratorConfig(key_dim=96, value_dim=96, rank=96, chunk_size=128),
        metadata={"help": "Shape of a freshly initialised generator (ignored with init_generator)."},
    )
    generator_overrides: dict[str, int | float | str] = field(
        default_factory=dict,
        metadata={
            "help": "Continue init_generator with these fields of its config changed; only fields no parameter's shape "
            f"depends on: {sorted(OVERRIDABLE)}. E.g. {{'rank': 32}}: with r = R1 = R2 every direction of a state, "
            "however weak, gets the same weight."
        },
    )
    steps: int = field(default=1000, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=1, metadata={"help": "Sequences (pretrain) or examples (instruct) per step."})
    micro_batch_size: int = field(
        default=0,
        metadata={
            "help": "Run each step's batch through forward+backward this many at a time (0 = all at once); the "
            "gradients are the same, the peak memory lower."
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up before cosine decay to 10%."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global gradient norm."})
    seed: int = field(default=0, metadata={"help": "Seed of data order and initialisation."})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bf16 autocast for the LM forward/backward. Only for hardware with native bf16 (GPUs, CPUs with "
            "AVX512-BF16/AMX): on an AVX2-only CPU a bf16 matmul ran ~67x slower than fp32."
        },
    )
    base_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the frozen LM's weights are loaded in: 'float32', or 'bfloat16' to halve their memory (a 7B "
            "base: 27 -> 13.5 GiB per GPU); the generator and its states stay fp32."
        },
    )
    num_chunks: int = field(default=4, metadata={"help": "n: chunks per pretraining sequence."})
    reconstruction: bool = field(default=True, metadata={"help": "Use the reconstruction task."})
    completion: bool = field(default=True, metadata={"help": "Use the completion task."})
    contrast_weight: float = field(
        default=0.0,
        metadata={
            "help": "Pretraining: weight of a hinge that asks each target to be read better with its own "
            "sequence's adapter than with the next sequence's of the same (micro-)batch, by contrast_margin "
            "nats per token (0 = off, the paper's losses)."
        },
    )
    contrast_margin: float = field(default=0.1, metadata={"help": "Pretraining: the contrastive hinge's margin."})
    objective: str = field(
        default="answer", metadata={"help": "Instruct loss: 'answer' (gold NLL), 'distill' (KL to prompted LM), 'mix'."}
    )
    pretrain_every: int = field(
        default=4, metadata={"help": "Instruct: every k-th step is a pretraining batch (0 = never)."}
    )
    sources: list[str] = field(
        default_factory=lambda: ["passages", "wiki", "icl", "facts"],
        metadata={
            "help": "Instruct data: any of passages, wiki, counterfactual, icl, facts (train/data.py, train/facts.py)."
        },
    )
    facts: int = field(default=0, metadata={"help": "Instruct: synthetic fact questions to mix in."})
    open_fact_values: float = field(
        default=0.0,
        metadata={
            "help": "Instruct: chance that a fact value (name, town, product, trade, dish, festival) comes from "
            "Wikipedia titles instead of train/facts.py's short lists (0 = lists only). "
            "On the lists alone the generator learnt to pick an entry, not to copy the value."
        },
    )
    max_context_tokens: int = field(default=512, metadata={"help": "Instruct: contexts are cut to this many tokens."})
    max_documents: int = field(default=0, metadata={"help": "Cap on pretraining documents (0 = all); for smoke tests."})
    heldout_docs: int = field(
        default=HELDOUT_WIKI_LEADS, metadata={"help": "Wikipedia leads kept out of training for evaluation."}
    )
    calibration_tokens: int = field(
        default=16384,
        metadata={
            "help": "Tokens of training text the memory's Σ is measured on before the first step, when the generator "
            "has memory_background > 0 and no Σ yet (GenerativeAdapter.calibrate_memory)."
        },
    )
    eval_every: int = field(default=100, metadata={"help": "Steps between held-out evaluations."})
    eval_sequences: int = field(
        default=8, metadata={"help": "Held-out sequences per evaluation (8, as every shipped generator was scored)."}
    )
    milestone_tokens: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Training tokens (nominal, see loop.step_tokens) at which to keep the generator with its held-out "
            "metrics in output_dir/milestones/<tokens>/: the points of a scaling curve (`genadapter train curve`)."
        },
    )
    log_every: int = field(default=10, metadata={"help": "Steps between JSONL log lines."})
    checkpoint_minutes: float = field(default=5.0, metadata={"help": "Save a resumable checkpoint this often."})
    max_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Time box (0 = none): stop after this many minutes of training and finish as if `steps` "
            "were done. The cosine follows whichever of steps and time is further along, so a time-boxed run (a lent "
            "GPU, a session's end) still ends at the low learning rate. Checkpoints keep the elapsed time."
        },
    )
    save_dtype: str = field(default="float16", metadata={"help": "dtype of the final generator weights."})

    def __post_init__(self) -> None:
        if isinstance(self.generator, dict):
            self.generator = GeneratorConfig.from_dict(self.generator)
        if self.recipe not in RECIPES:
            raise GenAdapterError(f"recipe must be one of {RECIPES}")
        if self.objective not in OBJECTIVES:
            raise GenAdapterError(f"objective must be one of {OBJECTIVES}")
        if self.recipe == "pretrain" and not (self.reconstruction or self.completion):
            raise GenAdapterError("pretraining needs reconstruction, completion or both")
        if self.max_minutes < 0:
            raise GenAdapterError("max_minutes must be 0 (no time box) or positive")
        if not 0 <= self.open_fact_values <= 1:
            raise GenAdapterError("open_fact_values must be between 0 and 1")
        check_overrides(self.generator_overrides)
        if self.generator_overrides and not self.init_generator:
            raise GenAdapterError("generator_overrides change init_generator; a fresh generator takes `generator`")
        if self.batch_size < 1 or self.micro_batch_size < 0:
            raise GenAdapterError("batch_size must be at least 1 and micro_batch_size 0 (off) or positive")
        if self.calibration_tokens < 1:
            raise GenAdapterError("calibration_tokens must be at least 1")
        if any(not isinstance(m, int) or m < 1 for m in self.milestone_tokens):
            raise GenAdapterError(
                f"milestone_tokens must be positive whole numbers of tokens, got {self.milestone_tokens}"
            )
        if self.num_chunks < 2:
            raise GenAdapterError("num_chunks must be at least 2 (completion predicts chunk i from chunks < i)")

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, overrides: dict | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise GenAdapterError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise GenAdapterError(f"config file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(cls, data: dict, overrides: dict | None = None) -> TrainConfig:
        """A config from `data` with `overrides` applied; an override "generator.FIELD" changes one field of the
        fresh generator's config (the rest as in `data`, or the default shape)."""
        data = dict(data)
        for key, value in (overrides or {}).items():
            if key.startswith("generator."):
                generator = data.get("generator", cls.__dataclass_fields__["generator"].default_factory())
                generator = generator.to_dict() if isinstance(generator, GeneratorConfig) else dict(generator)
                data["generator"] = {**generator, key.removeprefix("generator."): value}
            else:
                data[key] = value
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise GenAdapterError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**data)
