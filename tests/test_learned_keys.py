"""Learned memory keys (memory_learned_keys): the least-squares memory with a trained key projection P."""

import numpy as np
import pytest
import torch
from conftest import MEMORY, TEXT_A, TEXT_B, make_adapter, save_tiny_dirs
from test_train import tiny_train_config

from genadapter import GenerativeAdapter
from genadapter.config import GeneratorConfig
from genadapter.errors import GenAdapterError
from genadapter.train.objectives import pretrain_losses

LEARNED = {**MEMORY, "memory_learned_keys": True}


def projections(ga) -> list[torch.Tensor]:
    return [ga.generator.memory.projection(name) for name in ga.generator.memory.module_names]


def test_learned_keys_start_at_the_fixed_random_projection_and_are_parameters():
    fixed, learned = make_adapter(**MEMORY), make_adapter(**LEARNED)
    for p_fixed, p_learned in zip(projections(fixed), projections(learned), strict=True):
        assert torch.equal(p_fixed, p_learned)
        assert isinstance(p_learned, torch.nn.Parameter) and not isinstance(p_fixed, torch.nn.Parameter)
    assert not any(key.startswith("memory.") for key in fixed.generator.state_dict())
    assert any(key.startswith("memory.projection") for key in learned.generator.state_dict())
    ids, mask = fixed.pad([fixed.tokenizer("Where is the tower?")["input_ids"]])
    state = fixed.absorb(TEXT_A)
    assert torch.equal(fixed.logits(ids, mask, state=state), learned.logits(ids, mask, state=learned.absorb(TEXT_A)))


def test_the_loss_reaches_the_key_projection_through_the_write_and_the_read():
    """Gradients flow into P from the sums C, G (the write) and from P x (the read), and training P alone lowers
    the reconstruction loss of the absorbed text: what the memory keys on is learnable."""
    ga = make_adapter(trained=False, **(LEARNED | {"memory_layers": 2}))
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:64]
    config = tiny_train_config("x", "y", num_chunks=4)
    keys = projections(ga)

    def reconstruction() -> torch.Tensor:
        return pretrain_losses(ga, [ids], config, np.random.default_rng(0))["reconstruction"]

    reconstruction().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in keys)
    full = [p.grad.clone() for p in keys]
    # the read alone (keys of the write detached): a different gradient, so the write contributes too
    memory = ga.generator.memory
    original = memory.keys
    memory.keys = lambda name, x: original(name, x).detach()
    for p in keys:
        p.grad = None
    try:
        reconstruction().backward()
    finally:
        memory.keys = original
    assert any(not torch.allclose(p.grad, g, rtol=1e-3, atol=1e-8) for p, g in zip(keys, full, strict=True))

    optimizer = torch.optim.Adam(keys, lr=3e-2)
    before = reconstruction().item()
    for _ in range(15):
        optimizer.zero_grad()
        reconstruction().backward()
        optimizer.step()
    assert reconstruction().item() < before - 0.05


def test_learned_keys_save_load_and_switch_off(tmp_path):
    base, gen = save_tiny_dirs(tmp_path, **LEARNED)
    ga = GenerativeAdapter.from_pretrained(base=str(base), generator=gen)
    with torch.no_grad():
        for p in projections(ga):
            p.add_(0.1)
    ga.generator.save(gen)
    loaded = GenerativeAdapter.from_pretrained(base=str(base), generator=gen)
    assert loaded.fingerprint == ga.generator.fingerprint() != ga.fingerprint  # P is part of what it hashes
    for mine, theirs in zip(projections(ga), projections(loaded), strict=True):
        torch.testing.assert_close(mine, theirs)
    theirs = loaded.adapter_factors(loaded.absorb(TEXT_B))
    for key, value in ga.adapter_factors(ga.absorb(TEXT_B)).items():
        torch.testing.assert_close(theirs[key], value)
    off = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides={"memory_layers": 0})
    assert off.generator.memory is None
    with pytest.raises(GenAdapterError, match="cannot change"):
        GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides={"memory_keys": 4})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"memory_keys": 0}, "needs memory_keys > 0"),
        ({"memory_background": 8.0}, "go stale"),
    ],
)
def test_bad_learned_keys_config_is_a_clear_error(fields, message):
    with pytest.raises(GenAdapterError, match=message):
        GeneratorConfig(**(LEARNED | fields))


def test_learned_keys_field_keeps_older_fingerprints():
    assert "memory_learned_keys" not in GeneratorConfig(**MEMORY).identity()
    assert GeneratorConfig(**LEARNED).identity()["memory_learned_keys"] is True
