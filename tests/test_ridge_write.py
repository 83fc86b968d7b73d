"""The ridge ("least-squares") write: S~ = (G + μI)⁻¹ S with G = Σ KᵀK kept in the state beside S."""

import pytest
import torch
from conftest import RIDGE, TEXT_A, TEXT_B, make_adapter

from genadapter.errors import GenAdapterError
from genadapter.generator import gram_key, ridge_normalize


def test_ridge_recovers_a_linear_map_from_its_keys_and_values():
    """With a small ridge, S~ is the least-squares map W of V = K W: the adapter reads out what the keys predict,
    where the paper's plain sum KᵀV would return a blend weighted by how alike the keys are."""
    rng = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 6, generator=rng) * torch.tensor([5.0, 3.0, 1.0, 1.0, 0.3, 0.1])  # unequal energies
    weights = torch.randn(6, 4, generator=rng)
    values = keys @ weights
    solved = ridge_normalize(keys.T @ values, keys.T @ keys, 200, strength=1e-9)
    assert torch.allclose(solved, weights, atol=1e-4)
    assert not torch.allclose(keys.T @ values / (keys.T @ values).norm(), weights / weights.norm(), atol=0.1)


def test_ridge_state_holds_the_key_sums():
    ga = make_adapter(**RIDGE)
    state = ga.absorb(TEXT_A)
    r1 = ga.config.key_dim
    for name in ga.generator.module_names:
        gram = state.sums[gram_key(name)]
        assert gram.shape == (r1, r1) and torch.allclose(gram, gram.T)
        assert torch.linalg.eigvalsh(gram.double()).min() > -1e-4 * gram.diagonal().sum()
    assert state.nbytes == len(ga.generator.module_names) * 4 * (r1 * ga.config.value_dim + r1 * r1)


def test_ridge_adapter_is_the_solve_of_the_state():
    ga = make_adapter(**RIDGE, ridge=0.5)
    state = ga.absorb([TEXT_A, TEXT_B])
    factors = ga.adapter_factors(state)
    for name in ga.generator.module_names:
        S, G = state.sums[name].double(), state.sums[gram_key(name)].double()
        mu = 0.5 * G.trace() / state.num_tokens
        expected = torch.linalg.solve(G + mu * torch.eye(len(G), dtype=torch.float64), S).float()
        assert torch.allclose(factors[name], expected, rtol=1e-4, atol=1e-6)


def test_ridge_adapter_is_safe_on_every_reachable_state():
    """Subtracting text that was never absorbed leaves a G that is not positive semi-definite; the adapter stays
    finite. The empty state gives no adapter at all."""
    ga = make_adapter(**RIDGE)
    a, b = ga.absorb(TEXT_A), ga.absorb(TEXT_B)
    assert b.num_tokens < a.num_tokens
    odd = a - b
    assert any(torch.linalg.eigvalsh(odd.sums[gram_key(n)].double()).min() < 0 for n in ga.generator.module_names)
    assert all(torch.isfinite(f).all() for f in ga.adapter_factors(odd).values())
    assert all(torch.equal(f, torch.zeros_like(f)) for f in ga.adapter_factors(a - a).values())


def test_ridge_normalisation_without_the_key_sums_is_a_clear_error():
    ga = make_adapter(**RIDGE)
    sums = {name: s for name, s in ga.absorb(TEXT_A).sums.items() if name in ga.generator.module_names}
    with pytest.raises(GenAdapterError, match="G sums"):
        ga.generator.normalize(sums, 10)


def test_ridge_field_keeps_older_fingerprints_and_is_overridable():
    from genadapter.config import GeneratorConfig

    config = GeneratorConfig()
    assert "ridge" not in config.identity() and config.with_overrides({"ridge": 1.0}).identity()["ridge"] == 1.0
    with pytest.raises(GenAdapterError, match="ridge must be positive"):
        GeneratorConfig(ridge=0.0)
