"""The next-token memory (memory.py): what it writes, that it stores the context, and its config errors."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import MEMORY, TEXT_A, TEXT_B, make_adapter, tiny_config
from test_train import tiny_train_config

from genadapter import GenerativeAdapter
from genadapter.errors import GenAdapterError
from genadapter.memory import memory_key
from genadapter.train.objectives import context_adapters, pretrain_losses


def text_nll(ga, text: str, state) -> float:
    ids, mask = ga.pad([ga.tokenizer(text, add_special_tokens=False)["input_ids"]])
    logits = ga.logits(ids, mask, state=state)[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:]).item()


@pytest.mark.parametrize("targets_kind", ["next", "error"])
def test_memory_alone_makes_the_absorbed_text_likelier_than_another_texts_memory(targets_kind):
    """With B = 0 the generator adds nothing, so any change comes from the memory: it should lower the loss on
    the text it absorbed, and by more than the memory of an unrelated text does."""
    ga = make_adapter(trained=False, memory_layers=2, memory_keys=0, memory_scale=4.0, memory_targets=targets_kind)
    own, other = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    base = text_nll(ga, TEXT_A, None)
    assert text_nll(ga, TEXT_A, own) < base - 0.1
    assert text_nll(ga, TEXT_A, own) < text_nll(ga, TEXT_A, other) - 0.1


@pytest.mark.parametrize(
    ("targets_kind", "values"), [("next", 0), ("error", 0), ("error", 16)], ids=["next", "error", "error-16-values"]
)
@torch.no_grad()
def test_memory_map_is_the_ridge_solution_of_keys_to_next_token_embeddings(targets_kind, values):
    """Recompute C, G and W = η C (G + μI)⁻¹ from the module's inputs and the LM's own next-token distributions,
    captured independently of the library; with memory_values, C holds the projected targets R e, W = η Rᵀ C (…)⁻¹."""
    ga = make_adapter(**MEMORY, memory_targets=targets_kind, memory_values=values)
    name = ga.generator.memory.module_names[0]
    chunks, keys, probs = read_with_hook(ga, name, TEXT_B)
    embeddings = ga.model.get_output_embeddings().weight
    keys = torch.cat([k[:-1] for k in keys])
    targets = torch.cat([embeddings[torch.tensor(chunk[1:])] for chunk in chunks])
    if targets_kind == "error":  # minus the embedding the LM expected: the delta rule
        targets = targets - torch.cat(probs) @ embeddings
    expand = torch.eye(targets.shape[1])
    if values:
        projection = ga.generator.memory.value_projection(name)
        assert projection.shape == (values, targets.shape[1])
        targets, expand = targets @ projection.T, projection.T
    C, G = targets.T @ keys, keys.T @ keys
    ridge = MEMORY.get("memory_ridge", 0.1) * G.trace() / sum(map(len, chunks))
    expected = MEMORY["memory_scale"] * expand @ C @ torch.linalg.inv(G + ridge * torch.eye(len(G)))

    state = ga.absorb(TEXT_B, batch_size=1)
    torch.testing.assert_close(state.sums[memory_key(name, "values")], C, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.sums[memory_key(name, "keys")], G, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ga.adapter_factors(state)[memory_key(name, "map")], expected, rtol=1e-3, atol=1e-4)


@torch.no_grad()
def read_with_hook(ga, name: str, text: str) -> tuple[list[list[int]], list[torch.Tensor], list[torch.Tensor]]:
    """Independently of the library: a text's chunks, the memory keys P x of module `name` per chunk (T, k), and
    the LM's next-token distributions per chunk (T-1, V)."""
    chunks = ga.chunk([ga.tokenizer(text, add_special_tokens=False)["input_ids"]])
    captured, probs = [], []
    module = dict(ga.model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0][0]))
    try:
        for chunk in chunks:
            probs.append(torch.softmax(ga.model(input_ids=torch.tensor([chunk])).logits[0, :-1], dim=-1))
    finally:
        handle.remove()
    projection = ga.generator.memory.projection(name)
    return chunks, [x @ projection.T for x in captured], probs


BACKGROUND = {**MEMORY, "memory_background": 5.0}


@torch.no_grad()
def test_background_term_adds_beta_times_the_texts_mean_key_gram_to_the_solve():
    """W = η C (G + μI + βΣ)⁻¹ with Σ the mean k kᵀ over the calibration text, recomputed from the module's inputs."""
    ga = make_adapter(**BACKGROUND)
    name = ga.generator.memory.module_names[0]
    fingerprint = ga.fingerprint
    assert ga.calibrate_memory([TEXT_A, TEXT_B], batch_size=1) == sum(
        len(c) for c in ga.chunk(ga.tokenize_context([TEXT_A, TEXT_B]))
    )
    assert ga.fingerprint != fingerprint  # adapters of one state change with Σ: states made before do not mix
    keys = torch.cat(read_with_hook(ga, name, TEXT_A)[1] + read_with_hook(ga, name, TEXT_B)[1])
    background = keys.T @ keys / len(keys)
    torch.testing.assert_close(ga.generator.memory.background(name), background, rtol=1e-4, atol=1e-5)

    state = ga.absorb(TEXT_B)
    G, C = state.sums[memory_key(name, "keys")], state.sums[memory_key(name, "values")]
    ridge = ga.config.memory_ridge * G.trace() / state.num_tokens
    expected = ga.config.memory_scale * C @ torch.linalg.inv(G + ridge * torch.eye(len(G)) + 5.0 * background)
    torch.testing.assert_close(ga.adapter_factors(state)[memory_key(name, "map")], expected, rtol=1e-3, atol=1e-4)


def test_background_calibration_reads_at_most_max_tokens_in_order():
    ga = make_adapter(**BACKGROUND)
    name = ga.generator.memory.module_names[0]
    assert ga.calibrate_memory(TEXT_A, max_tokens=7) == 7
    keys = read_with_hook(ga, name, TEXT_A)[1][0][:7]
    torch.testing.assert_close(ga.generator.memory.background(name), keys.T @ keys / 7, rtol=1e-4, atol=1e-5)


def test_background_without_calibration_or_memory_is_a_clear_error():
    uncalibrated = make_adapter(**BACKGROUND)
    with pytest.raises(GenAdapterError, match="calibrate_memory"):
        uncalibrated.adapter_factors(uncalibrated.absorb(TEXT_A))
    with pytest.raises(GenAdapterError, match="memory_background > 0"):
        make_adapter(**MEMORY).calibrate_memory(TEXT_A)
    with pytest.raises(GenAdapterError, match="no text"):
        uncalibrated.calibrate_memory("   ")
    with pytest.raises(GenAdapterError, match="must be 0 or positive"):
        make_adapter(**MEMORY, memory_background=-1.0)


def save_calibrated(tiny_dirs, directory, overrides: dict) -> GenerativeAdapter:
    """The tiny generator with `overrides`, its Σ measured on TEXT_A, saved to `directory`; returns the adapter."""
    base, gen = tiny_dirs
    ga = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=overrides)
    ga.calibrate_memory(TEXT_A)
    ga.generator.save(directory)
    return ga


def test_a_calibrated_generator_saves_its_background_and_loads_with_it_off(tiny_dirs, tmp_path):
    """Σ travels with the weights; a generator loaded with β = 0 ignores it and is the plain memory generator, and
    one loaded with β > 0 but no Σ on disk says it needs calibrating when used."""
    base, gen = tiny_dirs
    ga = save_calibrated(tiny_dirs, tmp_path / "calibrated", BACKGROUND)
    loaded = GenerativeAdapter.from_pretrained(base=str(base), generator=tmp_path / "calibrated")
    assert loaded.fingerprint == ga.fingerprint
    state = ga.absorb(TEXT_B)
    for key, value in ga.adapter_factors(state).items():
        torch.testing.assert_close(loaded.adapter_factors(state)[key], value)

    off = GenerativeAdapter.from_pretrained(
        base=str(base), generator=tmp_path / "calibrated", overrides={"memory_background": 0.0}
    )
    plain = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=MEMORY)
    assert off.fingerprint == plain.fingerprint
    uncalibrated = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=BACKGROUND)
    with pytest.raises(GenAdapterError, match="calibrate_memory"):
        uncalibrated.adapter_factors(uncalibrated.absorb(TEXT_A))


@pytest.mark.parametrize(
    "change",
    [{"memory_keys": BACKGROUND["memory_keys"] * 2}, {"memory_layers": 1}, {"memory_module": "o_proj"}],
    ids=["width", "layers", "module"],
)
def test_other_key_projections_drop_the_saved_background_and_measure_their_own(tiny_dirs, tmp_path, change):
    """Σ belongs to the key projections it was measured for: a calibrated generator loaded with another width, fewer
    layers or another module (other projections, even where every Σ of the right shape is on disk) loads without it,
    says it needs calibrating when used, and calibrated again equals one calibrated from the start."""
    base, gen = tiny_dirs
    saved = BACKGROUND | {"memory_layers": 2}
    save_calibrated(tiny_dirs, tmp_path / "calibrated", saved)
    loaded = GenerativeAdapter.from_pretrained(base=str(base), generator=tmp_path / "calibrated", overrides=change)
    assert not loaded.generator.memory.calibrated
    with pytest.raises(GenAdapterError, match="calibrate_memory"):
        loaded.adapter_factors(loaded.absorb(TEXT_B))
    loaded.calibrate_memory(TEXT_A)
    fresh = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=saved | change)
    fresh.calibrate_memory(TEXT_A)
    state = fresh.absorb(TEXT_B)
    for key, value in fresh.adapter_factors(state).items():
        torch.testing.assert_close(loaded.adapter_factors(state)[key], value)


def test_fewer_stored_values_keep_the_saved_background_and_shrink_the_state(tiny_dirs, tmp_path):
    """memory_values changes what a state stores, not the keys: Σ measured for the keys still applies; C shrinks to
    m × k; R's rows are orthogonal, scaled so that E[Rᵀ R] = I (pushes keep their full-width size on average); and
    states made without it are refused."""
    base, gen = tiny_dirs
    ga = save_calibrated(tiny_dirs, tmp_path / "calibrated", BACKGROUND)
    narrow = GenerativeAdapter.from_pretrained(
        base=str(base), generator=tmp_path / "calibrated", overrides={"memory_values": 16}
    )
    assert narrow.generator.memory.calibrated
    name = narrow.generator.memory.module_names[0]
    torch.testing.assert_close(narrow.generator.memory.background(name), ga.generator.memory.background(name))
    full_state, state = ga.absorb(TEXT_B), narrow.absorb(TEXT_B)
    assert full_state.sums[memory_key(name, "values")].shape == (32, 8)
    assert state.sums[memory_key(name, "values")].shape == (16, 8)
    assert narrow.fingerprint != ga.fingerprint
    with pytest.raises(GenAdapterError, match="state was made by generator"):
        narrow.check_state(full_state)
    projection = narrow.generator.memory.value_projection(name)  # (16, 32): orthonormal rows, scaled by √(32 / 16)
    torch.testing.assert_close(projection @ projection.T, 2.0 * torch.eye(16))


def test_memory_off_keeps_release_fingerprints_and_state_format():
    config = tiny_config()
    assert not any(key.startswith("memory") for key in config.identity())
    plain, with_memory = make_adapter(), make_adapter(**MEMORY)
    assert plain.generator.memory is None and plain.absorb(TEXT_A).sums.keys() == set(plain.generator.module_names)
    assert with_memory.generator.fingerprint() != plain.generator.fingerprint()
    assert replace(config, **MEMORY).identity()["memory_layers"] == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"memory_layers": 1, "memory_module": "q_proj"}, "must be one of target_modules"),
        ({"memory_layers": -1}, "must be 0 or positive"),
        ({"memory_values": -1}, "must be 0 or positive"),
        ({"memory_ridge": 0.0}, "memory_ridge must be positive"),
        ({"memory_targets": "surprise"}, "memory_targets must be one of"),
    ],
)
def test_bad_memory_config_is_a_clear_error(overrides, message):
    with pytest.raises(GenAdapterError, match=message):
        tiny_config(**overrides)


def test_more_memory_layers_than_the_model_has_is_a_clear_error():
    with pytest.raises(GenAdapterError, match="exceeds the model's 2 layers"):
        make_adapter(memory_layers=3)


def test_stored_values_as_wide_as_the_module_are_a_clear_error():
    with pytest.raises(GenAdapterError, match="must be below the memory modules' output width 32"):
        make_adapter(**MEMORY, memory_values=32)


@pytest.mark.parametrize("targets_kind", ["next", "error"])
def test_training_reads_the_same_memory_as_inference(targets_kind):
    """The adapters training builds for a context (instruct path) are those absorb + adapter_factors give, and in
    pretraining the memory of the text seen so far lowers the reconstruction loss of spans of that text."""
    ga = make_adapter(trained=False, memory_layers=2, memory_keys=0, memory_scale=4.0, memory_targets=targets_kind)
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:64]
    trained_on = context_adapters(ga, [[ids]])
    used = ga.adapter_factors(ga.absorb(ids))
    assert trained_on.keys() == used.keys()
    for key, value in used.items():
        torch.testing.assert_close(trained_on[key][0], value, rtol=1e-4, atol=1e-5)

    config = tiny_train_config("x", "y", num_chunks=4)
    with_memory = pretrain_losses(ga, [ids], config, np.random.default_rng(0))
    plain = make_adapter(trained=False)  # same seeds: the same LM and generator, no memory
    without = pretrain_losses(plain, [ids], config, np.random.default_rng(0))
    assert with_memory["reconstruction"] < without["reconstruction"] - 0.1
    with_memory["loss"].backward()  # gradients still reach the generator through its own part
    assert all(p.grad is not None for p in ga.generator.parameters())


def test_a_trained_generator_loads_with_the_memory_switched_on(tiny_dirs):
    base, gen = tiny_dirs
    plain = GenerativeAdapter.from_pretrained(base=str(base), generator=gen)
    with_memory = GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides=MEMORY)
    assert plain.generator.memory is None and with_memory.generator.memory is not None
    assert with_memory.fingerprint != plain.fingerprint  # states of the two never mix
    for name, block in plain.generator.blocks.items():
        torch.testing.assert_close(with_memory.generator.blocks[name].B, block.B)
    with pytest.raises(GenAdapterError, match="may change only"):
        GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides={"key_dim": 4})
    with pytest.raises(GenAdapterError, match="must be of type int"):
        GenerativeAdapter.from_pretrained(base=str(base), generator=gen, overrides={"memory_layers": "1"})


def test_batched_memory_maps_are_the_ridge_solutions_row_by_row():
    """One map per context row, each with its own token count; a row with no token has no memory."""
    ga = make_adapter(**MEMORY)
    name = ga.generator.memory.module_names[0]
    keys = torch.randn(4, 300, 256, dtype=torch.float64)
    gram, values = keys.mT @ keys, torch.randn(4, 576, 256, dtype=torch.float64)
    tokens = torch.tensor([300, 200, 100, 0])
    ridge = ga.config.memory_ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / tokens.clamp_min(1)
    expected = ga.config.memory_scale * values @ torch.linalg.inv(gram + ridge[:, None, None] * torch.eye(256))
    sums = {memory_key(name, "keys"): gram.float(), memory_key(name, "values"): values.float()}
    maps = ga.generator.memory.maps(sums, tokens)[memory_key(name, "map")]
    torch.testing.assert_close(maps[:3], expected[:3].float(), rtol=1e-3, atol=1e-4)
    assert torch.count_nonzero(maps[3]) == 0


def test_every_state_that_adding_and_subtracting_can_reach_answers():
    """Subtracting text that was never absorbed leaves a key Gram matrix that is not positive semi-definite; the
    memory's solve must still give a finite adapter. (Proper states keep the exact solve, as
    test_memory_map_is_the_ridge_solution_of_keys_to_next_token_embeddings checks.)"""
    ga = make_adapter(memory_layers=1, memory_keys=8)
    texts = [TEXT_A, TEXT_B, "Bananas are yellow.", "The ferry leaves at noon.", "Zebra."]
    states = [ga.absorb(t) for t in texts]
    rng = random.Random(0)
    ids, mask = ga.pad([ga.tokenizer("Where is it?")["input_ids"]])
    reached = 0
    for _ in range(12):
        state = states[rng.randrange(len(states))]
        for _ in range(rng.randrange(1, 4)):
            other = states[rng.randrange(len(states))]
            if rng.random() < 0.5:
                state = state + other
            elif other.num_tokens <= state.num_tokens:
                state = state - other
        name = memory_key(ga.generator.memory.module_names[0], "keys")
        reached += bool(torch.linalg.eigvalsh(state.sums[name].double()).min() < -1e-6)
        assert torch.isfinite(ga.logits(ids, mask, state=state)).all()
    assert reached  # the walk did reach states without a positive semi-definite Gram matrix
