import json

import pytest
import torch
from conftest import MEMORY, TEXT_A, TEXT_B, make_adapter
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from genadapter import ContextState, GenAdapterError, IncompatibleStateError
from genadapter.adapter import MERGE_MIN_NEW_TOKENS
from genadapter.memory import memory_key


def test_untrained_generator_leaves_the_model_exactly_unchanged():
    ga = make_adapter(trained=False)
    state = ga.absorb(TEXT_A)
    ids, mask = ga.pad([ga.tokenizer("Where is it?")["input_ids"]])
    assert torch.equal(ga.logits(ids, mask, state=state), ga.logits(ids, mask))
    assert ga.generate("Where?", state=state, max_new_tokens=8) == ga.generate("Where?", max_new_tokens=8)


def test_trained_generator_changes_the_model(ga):
    ids, mask = ga.pad([ga.tokenizer("Where is it?")["input_ids"]])
    assert not torch.allclose(ga.logits(ids, mask, state=ga.absorb(TEXT_A)), ga.logits(ids, mask))


def test_absorbing_documents_equals_sum_of_states(ga):
    together = ga.absorb([TEXT_A, TEXT_B])
    assert together.allclose(ga.absorb(TEXT_A) + ga.absorb(TEXT_B))
    assert together.num_tokens == len(ga.tokenizer(TEXT_A)["input_ids"]) + len(ga.tokenizer(TEXT_B)["input_ids"])


def test_add_then_subtract_restores(ga):
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    assert ((a + b) - b).allclose(a)


def test_chunk_batching_does_not_change_state(ga):
    one_by_one = ga.absorb(TEXT_A, batch_size=1)
    batched = ga.absorb(TEXT_A, batch_size=64)
    assert one_by_one.allclose(batched)


def test_token_ids_and_text_give_the_same_state(ga):
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"]
    assert ga.absorb(ids).allclose(ga.absorb(TEXT_A))
    assert ga.absorb(torch.tensor(ids)).allclose(ga.absorb(TEXT_A))


def test_state_is_sum_over_independent_chunks(ga):
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"]
    w = ga.config.chunk_size
    chunks = [ids[i : i + w] for i in range(0, len(ids), w)]
    assert len(chunks) > 2
    summed = ga.absorb(chunks[0])
    for chunk in chunks[1:]:
        summed = summed + ga.absorb(chunk)
    assert summed.allclose(ga.absorb(ids))


def test_per_row_adapters_equal_one_at_a_time(ga):
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    prompts = ["Where is the tower?", "Who won?", "Hi"]
    states = [a, b, None]
    batched = ga.generate(prompts, state=states, max_new_tokens=6)
    single = [ga.generate(p, state=s, max_new_tokens=6) for p, s in zip(prompts, states, strict=True)]
    assert batched == single
    batched_scores = ga.score(prompts, [" Paris", " Curie", " yes"], state=states)
    single_scores = [
        ga.score(p, c, state=s)[0] for p, c, s in zip(prompts, [" Paris", " Curie", " yes"], states, strict=True)
    ]
    assert batched_scores == pytest.approx(single_scores, abs=1e-4)


def test_merge_matches_hooks_and_unmerge_restores_bit_exactly(ga):
    state = ga.absorb(TEXT_A)
    before = {k: v.clone() for k, v in ga.model.state_dict().items()}
    ids, mask = ga.pad([ga.tokenizer("Where is it?")["input_ids"]])
    hooked = ga.logits(ids, mask, state=state)
    with ga.merged(state):
        assert torch.allclose(ga.logits(ids, mask), hooked, atol=1e-5)
        with pytest.raises(GenAdapterError, match="merged"):
            ga.logits(ids, mask, state=state)
    after = ga.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_merged_generation_equals_hooked_and_leaves_the_original_weights(ga):
    state = ga.absorb(TEXT_A)
    weights = {name: (p.data_ptr(), p.detach().clone()) for name, p in ga.model.named_parameters()}
    prompts = ["Where is the tower?", "Who built it?"]
    n = MERGE_MIN_NEW_TOKENS  # from here on generate merges by default
    hooked = ga.generate(prompts, state=state, max_new_tokens=n, merge=False)
    assert ga.generate(prompts, state=state, max_new_tokens=n, merge=True) == hooked
    merges = []
    ga.injector.merge = lambda factors: merges.append(type(ga.injector).merge(ga.injector, factors))
    try:
        assert ga.generate(prompts, state=[state, state], max_new_tokens=n) == hooked
        assert len(merges) == 1
        ga.generate(prompts, state=state, max_new_tokens=n - 1)
        assert len(merges) == 1  # too few tokens to repay the merge: hooks
    finally:
        del ga.injector.merge
    for name, p in ga.model.named_parameters():  # the very same memory, never written
        assert p.data_ptr() == weights[name][0] and torch.equal(p, weights[name][1])
    assert not ga.injector.is_merged


def test_adapter_factors_are_reused_until_the_state_or_the_generator_changes(ga):
    state = ga.absorb(TEXT_A)
    first = ga.adapter_factors(state)
    assert all(first[k] is v for k, v in ga.adapter_factors(state).items())

    def fresh() -> dict:
        with torch.no_grad():
            return ga.generator.adapters({k: v.clone() for k, v in state.sums.items()}, state.num_tokens)

    def check() -> None:
        factors = ga.adapter_factors(state)
        assert all(factors[k] is not first[k] for k in first)
        for key, value in fresh().items():
            torch.testing.assert_close(factors[key], value, rtol=0, atol=0)

    name = ga.generator.module_names[0]
    state.sums[name].mul_(3.0)  # changed in place
    check()
    first = ga.adapter_factors(state)
    state.sums[name] = state.sums[name] * 0.5  # replaced
    check()
    first = ga.adapter_factors(state)
    state.num_tokens += 5
    check()
    first = ga.adapter_factors(state)
    with torch.no_grad():
        ga.generator.block(name).B.mul_(2.0)  # the generator trained on
    check()


def test_save_load_round_trip(ga, tmp_path):
    state = ga.absorb(TEXT_A)
    state.save(tmp_path / "s.gas")
    loaded = ContextState.load(tmp_path / "s.gas")
    assert loaded.allclose(state, rtol=0, atol=0)
    assert loaded.generator_fingerprint == state.generator_fingerprint
    memory = 4 * (32 * 8 + 8 * 8) if ga.generator.memory is not None else 0  # C (d_out, k) + G (k, k), one module
    grams = 2 if ga.config.normalization == "ridge" else 1  # the ridge write keeps G (R1 x R1) beside S
    assert loaded.nbytes == state.nbytes == grams * 4 * 2 * 2 * 8 * 8 + memory  # 2 layers x 2 modules x R1 x R2 fp32


def test_half_precision_state_keeps_every_entry_within_its_bound(ga):
    state = ga.absorb(TEXT_A)
    state.sums = {k: v * 1e6 for k, v in state.sums.items()}  # sums of many tokens: far beyond float16's range
    data = state.to_bytes(half=True)
    loaded = ContextState.from_bytes(data)
    assert all(t.dtype == torch.float16 for t in load_safetensors(data).values())  # 2 bytes per entry
    assert loaded.num_tokens == state.num_tokens
    for name, exact in state.sums.items():
        got = loaded.sums[name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        bound = 2**-11 * exact.abs() + 2**-25 * exact.abs().max()
        assert ((got - exact).abs() <= bound).all(), name
    assert ContextState.from_bytes(loaded.to_bytes(half=True)).allclose(loaded, rtol=0, atol=0)  # stable


def test_symmetric_sums_are_stored_as_their_upper_triangle():
    """The memory's key Gram G = Σ k kᵀ is exactly symmetric: files keep its upper triangle (k (k + 1) / 2 entries)
    and lose nothing, in float32 and in float16; sums that are not symmetric (the write's S) are kept whole."""
    ga = make_adapter(**MEMORY)
    state = ga.absorb(TEXT_A)
    gram = memory_key(ga.generator.memory.module_names[0], "keys")
    for half in (False, True):
        data = state.to_bytes(half=half)
        stored = load_safetensors(data)
        assert stored[gram].shape == (8 * 9 // 2,)
        assert all(stored[key].shape == value.shape for key, value in state.sums.items() if key != gram)
        loaded = ContextState.from_bytes(data)
        assert torch.equal(loaded.sums[gram], loaded.sums[gram].mT)
    assert ContextState.from_bytes(state.to_bytes()).allclose(state, rtol=0, atol=0)


def test_state_files_written_before_packing_still_load():
    """Formats /1 (float32) and /2 (float16) hold every sum whole; they read back as the packed formats do."""
    ga = make_adapter(**MEMORY)
    state = ga.absorb(TEXT_A)
    whole = {key: value.contiguous() for key, value in state.sums.items()}
    assert ContextState.from_bytes(save_safetensors(whole, metadata=state.metadata("genadapter-state/1"))).allclose(
        state, rtol=0, atol=0
    )
    scales = {key: float(value.abs().max()) for key, value in whole.items()}
    halves = {key: (value / scales[key]).half() for key, value in whole.items()}
    metadata = state.metadata("genadapter-state/2") | {"scales": json.dumps(scales)}
    old_half = ContextState.from_bytes(save_safetensors(halves, metadata=metadata))
    assert old_half.allclose(ContextState.from_bytes(state.to_bytes(half=True)), rtol=0, atol=0)


def test_states_of_other_generators_do_not_mix(ga):
    other = make_adapter(seed=5)
    a, b = ga.absorb(TEXT_A), other.absorb(TEXT_A)
    with pytest.raises(IncompatibleStateError):
        a + b
    with pytest.raises(IncompatibleStateError):
        ga.generate("q", state=b)


def test_subtracting_more_than_was_absorbed_is_an_error(ga):
    with pytest.raises(IncompatibleStateError):
        ga.absorb(TEXT_B) - ga.absorb(TEXT_A)


@pytest.mark.parametrize("bad", ["", [], [""], [1.5], None])
def test_empty_or_bad_context_is_a_clear_error(ga, bad):
    with pytest.raises(GenAdapterError):
        ga.absorb(bad)


def test_wrong_number_of_states_is_a_clear_error(ga):
    with pytest.raises(GenAdapterError, match="2 states for 3 prompts"):
        ga.generate(["a", "b", "c"], state=[ga.absorb(TEXT_A)] * 2)


def test_frobenius_normalisation_runs(ga):
    ga2 = make_adapter(normalization="frobenius")
    norms = ga2.adapter_factors(ga2.absorb(TEXT_A))
    assert all(torch.linalg.matrix_norm(v).item() == pytest.approx(1.0, abs=1e-5) for v in norms.values())


def test_removing_everything_gives_exactly_no_adapter(ga):
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    empty = (a + b) - a - b
    assert empty.num_tokens == 0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in empty.sums.values())
    ids, mask = ga.pad([ga.tokenizer("Where?")["input_ids"]])
    assert torch.equal(ga.logits(ids, mask, state=empty), ga.logits(ids, mask))


def test_embedded_model_always_ends_turns_with_im_end(tmp_path, monkeypatch):
    """transformers 5.17 converted the GGUF with eos <|im_start|>: answers trained to end with eos then ran on."""
    from conftest import save_tiny_dirs
    from transformers import AutoTokenizer

    import genadapter.base_model as models

    base, _ = save_tiny_dirs(tmp_path)
    converted = AutoTokenizer.from_pretrained(base)
    converted.eos_token = "<|im_start|>"
    converted.save_pretrained(base)
    monkeypatch.setattr(models, "resolve_base", lambda name: (models.EMBEDDED_MODEL, base))
    _, model, tokenizer = models.load_base(None)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == end
    assert model.generation_config.eos_token_id == end == model.generation_config.pad_token_id


def test_atomic_writes_get_the_usual_file_and_directory_modes(tmp_path):
    """Outputs are built in temporary files (0600) and directories (0700): they must end with the modes a plain write
    would have given them, or other users and tools cannot read a state, a PEFT directory or a results file."""
    import os

    from genadapter.fileio import write_atomic, write_dir_atomic

    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "f.json", lambda p: p.write_text("{}"))
        write_dir_atomic(tmp_path / "d", lambda p: (p / "m").write_text("x"), marker="m")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
