import copy
import json

import pytest
import torch
from conftest import MEMORY, RIDGE, TEXT_A, make_adapter
from peft import PeftModel

from genadapter import GenerativeAdapter


@pytest.mark.parametrize(
    "overrides",
    [
        {"normalization": "svd"},
        {"normalization": "frobenius"},
        {"normalization": "svd", **MEMORY},
        {"normalization": "svd", **MEMORY, "memory_keys": 0},  # full-width keys: factors from an SVD
        {"normalization": "svd", **MEMORY, "memory_learned_keys": True},
        {"normalization": "svd", **MEMORY, "memory_values": 16},  # targets stored at 16 of the module's 32 dims
        RIDGE,
    ],
    ids=["svd", "frobenius", "with-memory", "with-full-memory", "with-learned-memory", "with-fewer-values", "ridge"],
)
def test_peft_export_gives_identical_logits(tmp_path, overrides):
    ga = make_adapter(rank=6, **overrides)
    state = ga.absorb(TEXT_A)
    ga.export_peft(state, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == ga.generator.export_rank()
    memory = ga.generator.memory.module_names if ga.generator.memory is not None else []
    assert len(config["rank_pattern"]) == len(memory)

    peft_model = PeftModel.from_pretrained(copy.deepcopy(ga.model), tmp_path / "lora").eval()
    ids, mask = ga.pad([ga.tokenizer("Where is the tower? It is in")["input_ids"]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    ours = ga.logits(ids, mask, state=state)
    assert not torch.allclose(ours, ga.logits(ids, mask), atol=1e-3)  # the adapter does something
    assert (theirs - ours).abs().max().item() <= 1e-4


def test_from_pretrained_with_local_base_and_generator(tiny_dirs):
    base, gen = tiny_dirs
    ga = GenerativeAdapter.from_pretrained(base=str(base), generator=gen)
    assert ga.base_name == str(base)
    assert isinstance(ga.generate("hi", state=ga.absorb(TEXT_A), max_new_tokens=3), str)


def test_from_pretrained_without_generator_warns_untrained(tiny_dirs, caplog):
    base, _ = tiny_dirs
    with caplog.at_level("WARNING"):
        ga = GenerativeAdapter.from_pretrained(base=str(base), config=make_adapter().config)
    assert "UNTRAINED GENERATOR" in caplog.text
    assert all(torch.equal(b.B, torch.zeros_like(b.B)) for b in ga.generator.blocks.values())
