from dataclasses import replace

import pytest
import torch
from conftest import TEXT_A, make_adapter, tiny_config

from genadapter.generator import normalize_state


def test_svd_normalisation_gives_orthonormal_factor():
    torch.manual_seed(0)
    out = normalize_state(torch.randn(3, 8, 6), tiny_config(key_dim=8, value_dim=6, rank=4))
    singular = torch.linalg.svdvals(out)
    assert torch.allclose(singular[:, :4], torch.ones(3, 4), atol=1e-5)
    assert torch.allclose(singular[:, 4:], torch.zeros(3, 2), atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "rank", "tokens"),
    [((8, 6), 4, 16), ((6, 8), 6, 16), ((8, 8), 8, 3), ((96, 96), 96, 512), ((96, 96), 96, 40)],
)
def test_svd_normalisation_matches_torch_svd(shape, rank, tokens):
    """The Gram-matrix SVD gives torch.linalg.svd's U_r V_rᵀ: tall, wide, truncated and rank-deficient states
    (fewer tokens than rows), for states built like the real ones (sums of key-value outer products)."""
    torch.manual_seed(0)
    keys, values = torch.randn(4, tokens, shape[0]), torch.randn(4, tokens, shape[1])
    S = keys.mT @ values
    U, _, Vh = torch.linalg.svd(S.double(), full_matrices=False)
    keep = min(rank, tokens)
    expected = U[..., :keep] @ Vh[..., :keep, :]
    out = normalize_state(S, tiny_config(key_dim=shape[0], value_dim=shape[1], rank=rank))
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-4)


def test_svd_backward_is_the_exact_gradient_without_truncation():
    torch.manual_seed(0)
    S = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    config = tiny_config(key_dim=5, value_dim=5, rank=5)
    assert torch.autograd.gradcheck(lambda x: normalize_state(x, config).double(), (S,), eps=1e-6, atol=1e-4)


def test_svd_backward_stays_finite_on_rank_deficient_states():
    """A 2-token chunk gives a rank-2 state in 8x8: torch's SVD gradient blows up there, ours does not."""
    torch.manual_seed(0)
    keys, values = torch.randn(2, 8), torch.randn(2, 8)
    S = (keys.T @ values).requires_grad_(True)
    target = torch.randn(8, 8)
    (normalize_state(S, tiny_config()) * target).sum().backward()
    assert torch.isfinite(S.grad).all() and S.grad.abs().sum() > 0

    naive = S.detach().clone().requires_grad_(True)
    U, _, Vh = torch.linalg.svd(naive)
    (U @ Vh * target).sum().backward()
    naive_size = naive.grad.abs().max() if torch.isfinite(naive.grad).all() else torch.tensor(float("inf"))
    assert naive_size > 1e3 * S.grad.abs().max()


def test_zero_state_gives_zero_adapter():
    out = normalize_state(torch.zeros(8, 8), tiny_config())
    assert torch.equal(out, torch.zeros(8, 8))


@pytest.mark.parametrize("shift", [0, 1, 5])
def test_chunk_states_follow_the_per_module_formula(shift):
    """The fused per-layer path equals S = Σ_t K_tᵀ V_(t+shift) with K = RMSNorm_γ(H) A2ᵀ, V = RMSNorm_γ(H) A3ᵀ,
    module by module, pairs within a chunk, padding excluded; gradients into γ, A2, A3 agree too."""
    torch.manual_seed(0)
    ga = make_adapter(trained=False, target_modules=["o_proj", "down_proj"], value_shift=shift)
    for p in ga.generator.parameters():
        p.data.normal_()
    ga.generator.requires_grad_(True)
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"]
    hidden, mask = ga.encode_chunks(ga.chunk([ids[:40]]))
    assert (mask == 0).any()  # the last chunk is padded

    fused = ga.generator.chunk_states(hidden, mask)
    params = [p for n, p in ga.generator.named_parameters() if n.rsplit(".", 1)[-1] in ("gamma", "A2", "A3")]
    grads_fused = torch.autograd.grad(sum(s.pow(2).sum() for s in fused.values()), params)
    reference = {}
    for name, spec in ga.generator.targets.items():
        block, h = ga.generator.block(name), hidden[spec.layer]
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + ga.config.norm_eps) * block.gamma
        h = h * mask.unsqueeze(-1)
        keys, values = h @ block.A2.T, h @ block.A3.T  # (N, T, R)
        pairs = [torch.einsum("nr,ns->nrs", keys[:, t], values[:, t + shift]) for t in range(h.shape[1] - shift)]
        reference[name] = torch.stack(pairs).sum(0)
    grads_ref = torch.autograd.grad(sum(s.pow(2).sum() for s in reference.values()), params)

    assert list(fused) == list(reference)
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_fused, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_value_shift_pairs_never_cross_chunks_and_keep_release_fingerprints():
    """A chunk no longer than the shift has no pair (zero state); the shift changes the fingerprint, while the
    default (a field added after the first generators shipped) leaves fingerprints as they were."""
    ga = make_adapter(trained=False, chunk_size=2, value_shift=2)
    hidden, mask = ga.encode_chunks(ga.chunk([ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:6]]))
    assert all(torch.equal(s, torch.zeros_like(s)) for s in ga.generator.chunk_states(hidden, mask).values())
    config = tiny_config()
    assert "value_shift" not in config.identity() and replace(config, value_shift=1).identity()["value_shift"] == 1
    shifted = make_adapter(value_shift=1)
    assert shifted.generator.fingerprint() != make_adapter().generator.fingerprint()


@pytest.mark.parametrize("normalization", ["svd", "ridge"])
def test_generator_trains_on_short_chunks_without_nan(normalization):
    """A few optimisation steps through the frozen LM on 3-token chunks stay finite and lower the loss."""
    ga = make_adapter(trained=False, chunk_size=3, normalization=normalization)
    ga.generator.requires_grad_(True)
    optimizer = torch.optim.AdamW(ga.generator.parameters(), lr=1e-2)
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"][:48]
    chunks = ga.chunk([ids])
    hidden, mask = ga.encode_chunks(chunks)
    target, target_mask = ga.pad([ids[:24]])
    losses = []
    for _ in range(8):
        sums = {k: v.sum(0, keepdim=True) for k, v in ga.generator.chunk_states(hidden, mask).items()}
        with ga.injector.activate(ga.generator.normalize(sums, len(ids))):
            loss = ga.model(input_ids=target, attention_mask=target_mask, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in ga.generator.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_save_load_generator_round_trip(tmp_path):
    ga = make_adapter()
    ga.generator.save(tmp_path / "g")
    loaded = type(ga.generator).load(tmp_path / "g", ga.model)
    assert loaded.fingerprint() == ga.generator.fingerprint()
    assert (tmp_path / "g" / "generator_config.json").is_file()


def test_config_validation():
    with pytest.raises(Exception, match="rank"):
        tiny_config(rank=99)
    with pytest.raises(Exception, match="normalization"):
        tiny_config(normalization="l2")
    with pytest.raises(Exception, match="not found"):
        make_adapter(target_modules=["nope_proj"])
