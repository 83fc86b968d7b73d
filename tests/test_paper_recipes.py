"""The paper-scale recipes (configs/recipes/mistral-7b-*.json): the paper's generator for Mistral-7B-Instruct-v0.2,
its parameter count on Mistral-7B's real shapes (a meta-device model: nothing allocated, nothing downloaded), and a
dry run of each recipe on a tiny random model of the same architecture through `train`, the code path of
`genadapter train pretrain|instruct`, with the recipe's generator settings kept and only the run made small."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM

import genadapter.train.loop as loop
from genadapter.config import GeneratorConfig
from genadapter.generator import AdapterGenerator
from genadapter.testing import make_mistral, make_tokenizer
from genadapter.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PAPER_RECIPES = {
    "pretrain": ROOT / "configs" / "recipes" / "mistral-7b-pretrain.json",
    "instruct": ROOT / "configs" / "recipes" / "mistral-7b-instruct.json",
}
# Mistral-7B-Instruct-v0.2's config.json, the fields that decide parameter shapes
MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=1e6,
    sliding_window=None,
)
# the paper's generator (docs/design.md): o_proj only, R1 = R2 = 1024, r = 128, α = 64, windows of 1024 tokens
PAPER_GENERATOR = dict(
    target_modules=["o_proj"], key_dim=1024, value_dim=1024, rank=128, alpha=64.0, chunk_size=1024, memory_layers=0
)
HIDDEN, LAYERS = 64, 2


@pytest.mark.parametrize("recipe", sorted(PAPER_RECIPES))
def test_paper_recipe_names_the_base_and_the_papers_generator(recipe):
    path = PAPER_RECIPES[recipe]
    config = TrainConfig.load(path)
    assert config.recipe == recipe and config.base == "mistralai/Mistral-7B-Instruct-v0.2"
    assert config.init_generator is None  # a fresh generator of the paper's shape (instruct: see the README)
    assert {key: getattr(config.generator, key) for key in PAPER_GENERATOR} == PAPER_GENERATOR
    assert config.generator.normalization == "svd" and config.bf16
    # chunk_mode stays at its default: training encodes chunks independently only
    assert "chunk_mode" not in json.loads(path.read_text())["generator"]
    assert config.num_chunks * config.generator.chunk_size == 4096  # the authors' max_length: 4 windows of 1024


def test_paper_generator_has_the_parameter_count_the_memory_plan_uses():
    """537,001,984 parameters = 32 × (A1 + A2 + A3 + B + γ) = 32 × (4 · 1024 · 4096 + 4096), as docs/training.md
    ("Paper scale") says, and the LM has 7,241,732,096."""
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B))
        generator = AdapterGenerator.for_model(model, TrainConfig.load(PAPER_RECIPES["pretrain"]).generator)
    lm = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for p in generator.parameters())
    assert (lm, count) == (7_241_732_096, 32 * (4 * 1024 * 4096 + 4096)) == (7_241_732_096, 537_001_984)
    block = generator.block("model.layers.31.self_attn.o_proj")
    assert {n: tuple(p.shape) for n, p in block.named_parameters()} == {
        "gamma": (4096,),
        "A1": (1024, 4096),
        "A2": (1024, 4096),
        "A3": (1024, 4096),
        "B": (4096, 1024),
    }
    plan = (ROOT / "docs" / "training.md").read_text()
    assert "537,001,984" in plan and "7,241,732,096" in plan


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory) -> Path:
    """A random Mistral with the real one's module names (o_proj 64 → 64), and the tiny byte tokenizer."""
    tokenizer = make_tokenizer()
    model = make_mistral(
        len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=224,  # 3.5 × hidden, as 14,336 / 4,096
        num_hidden_layers=LAYERS,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        sliding_window=None,
    )
    directory = tmp_path_factory.mktemp("tiny-mistral")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# What makes a dry run slow, made small; the generator, optimiser and precision settings stay the recipe's, but bf16
# (this CPU has no native bf16, and Accelerate takes one mixed-precision setting per process).
DRY_RUN = dict(
    steps=2,
    warmup_steps=1,
    bf16=False,
    max_documents=50,
    heldout_docs=20,
    eval_sequences=2,
    log_every=1,
    checkpoint_minutes=0.0,
)
PER_RECIPE = {
    # 2 chunks, not 4: each prefix state is a 1024 × 1024 eigendecomposition (≈ 0.6 s on one core here)
    "pretrain": dict(num_chunks=2),
    # the fact source alone: building the full mix reads every MetaICL task and Wikipedia lead (≈ 1 min here)
    "instruct": dict(batch_size=2, sources=["facts"], facts=40),
}


@pytest.mark.parametrize("recipe", sorted(PAPER_RECIPES))
def test_paper_recipe_trains_on_a_tiny_mistral(recipe, tiny_mistral, tmp_path, monkeypatch):
    """Two real optimizer steps of the recipe, with its generator shape (R1 = R2 = 1024, r = 128, windows of 1024)
    on a model of d = 64: finite losses, a checkpoint, a generator directory that loads back, A1 of (1024, 64)."""
    # The held-out evaluation every run ends with normalises several hundred 1024 × 1024 states (minutes on this
    # CPU); it is tested at small R in test_train.py. Here the run calls it and gets no metrics back.
    evaluated = []

    def no_metrics(self, ga):
        evaluated.append(True)
        return {}

    monkeypatch.setattr(loop.HeldOut, "evaluate", no_metrics)
    out = tmp_path / recipe
    overrides = {**DRY_RUN, **PER_RECIPE[recipe], "base": str(tiny_mistral), "output_dir": str(out)}
    config = TrainConfig.load(PAPER_RECIPES[recipe], overrides)
    final = loop.train(config)

    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [record for record in log if "loss" in record]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(f"{recipe}.{'completion' if recipe == 'pretrain' else 'answer'}" in r for r in steps)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2 and evaluated
    assert (final / "heldout_metrics.json").is_file()

    written = GeneratorConfig.load(final / "generator_config.json")
    assert {key: getattr(written, key) for key in PAPER_GENERATOR} == PAPER_GENERATOR
    assert written.normalization == "svd"
    weights = load_file(str(final / "generator.safetensors"))
    expected = {
        "gamma": (HIDDEN,),
        "A1": (1024, HIDDEN),
        "A2": (1024, HIDDEN),
        "A3": (1024, HIDDEN),
        "B": (HIDDEN, 1024),
    }
    assert {name: tuple(tensor.shape) for name, tensor in weights.items()} == {
        f"blocks.model/layers/{layer}/self_attn/o_proj.{part}": shape
        for layer in range(LAYERS)
        for part, shape in expected.items()
    }
    # B starts at zero, so the first step trains B alone; in the second, A1 and (through the SVD normaliser's backward)
    # A2 and A3 move too. γ's change is below float16's resolution at 1.
    model = MistralForCausalLM.from_pretrained(tiny_mistral)
    initial = AdapterGenerator.for_model(model, written).state_dict()  # the seeded initialisation
    assert all(
        not torch.equal(weights[name], initial[name].to(weights[name].dtype))
        for name in weights
        if not name.endswith("gamma")
    )
    saved = TrainConfig.load(out / "train_config.json")  # the recipe's optimiser settings, not the defaults
    recipe_values = TrainConfig.load(PAPER_RECIPES[recipe])
    assert (saved.lr, saved.weight_decay, saved.micro_batch_size) == (
        recipe_values.lr,
        recipe_values.weight_decay,
        recipe_values.micro_batch_size,
    )
    AdapterGenerator.load(final, model)  # fits the model it was made for
