"""Tiny random llama-style models and a byte-level tokenizer, built in-process: fast, offline, seeded.

An internal module for tests and benchmarks (as `transformers.testing_utils` is): it is not part of the public API
and may change without notice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from .adapter import GenerativeAdapter
from .config import GeneratorConfig
from .generator import AdapterGenerator

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT_A = "The Eiffel Tower is in Paris. It was finished in 1889 and is 330 metres tall. " * 3
TEXT_B = "Marie Curie won two Nobel prizes, in physics in 1903 and in chemistry in 1911."


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def make_mistral(vocab_size: int, seed: int = 0, **config) -> MistralForCausalLM:
    """A tiny random Mistral (hidden 64, 2 layers) with the real one's module names; `config` changes its fields."""
    torch.manual_seed(seed)
    values = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return MistralForCausalLM(MistralConfig(**{**values, **config})).eval().requires_grad_(False)


def tiny_config(**overrides) -> GeneratorConfig:
    values = dict(key_dim=8, value_dim=8, rank=8, chunk_size=16, alpha=8.0, base_model="tiny")
    values.update(overrides)
    return GeneratorConfig(**values)


def randomize_b(generator: AdapterGenerator, seed: int = 1, std: float = 0.5) -> None:
    """Give B non-zero values so adapters change outputs (as a trained generator would)."""
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in generator.blocks.values():
            block.B.copy_(torch.randn(block.B.shape, generator=rng) * std)


def make_adapter(trained: bool = True, **config_overrides) -> GenerativeAdapter:
    tokenizer = make_tokenizer()
    model = make_model(len(tokenizer))
    generator = AdapterGenerator.for_model(model, tiny_config(**config_overrides))
    if trained:
        randomize_b(generator)
    return GenerativeAdapter(model, tokenizer, generator, "tiny")


def save_tiny_dirs(directory: Path, **config_overrides) -> tuple[Path, Path]:
    """A tiny base model and a generator (tiny_config with `config_overrides`) saved under `directory`, as the CLI
    and from_pretrained load them."""
    adapter = make_adapter(**config_overrides)
    base, gen = directory / "base", directory / "gen"
    adapter.model.save_pretrained(base)
    adapter.tokenizer.save_pretrained(base)
    adapter.generator.config.base_model = str(base)
    adapter.generator.save(gen)
    return base, gen
