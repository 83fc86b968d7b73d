"""The device path of the SVD normalisation (matrix products only, for GPUs) against the exact path (fp64
eigendecomposition on CPU threads), both run here on CPU tensors: same normalised states, same gradients, on
full-rank, rank-deficient, zero and batched states; and nothing of it reads a value back on the host. Last, the
training step's other former host round trips."""

import numpy as np
import pytest
import torch
from conftest import TEXT_A, make_adapter, tiny_config

from genadapter.errors import GenAdapterError
from genadapter.generator import (
    NORMALIZER_ENV,
    _SVDNormalize,
    normalize_state,
    normalizer_for,
    polar_map,
    polar_schedule,
    spectral_upper_bound,
)
from genadapter.train import TrainConfig
from genadapter.train.loop import TrainingError, host_losses
from genadapter.train.objectives import context_adapters, pretrain_losses, row_means


def config_for(S: torch.Tensor, rank: int | None = None):
    r1, r2 = S.shape[-2:]
    return tiny_config(key_dim=r1, value_dim=r2, rank=rank or min(r1, r2))


def both_paths(S: torch.Tensor, rank: int | None = None, seed: int = 1):
    """Outputs and gradients (for one random upstream gradient) of the exact and the device path."""
    results = []
    upstream = torch.randn(S.shape, generator=torch.Generator().manual_seed(seed), dtype=S.dtype)
    for method in ("exact", "device"):
        leaf = S.detach().clone().requires_grad_(True)
        out = normalize_state(leaf, config_for(S, rank), method=method)
        (out * upstream).sum().backward()
        results.append((out.detach(), leaf.grad))
    return results


def assert_same(S: torch.Tensor, rank: int | None = None) -> None:
    (exact, exact_grad), (device, device_grad) = both_paths(S, rank)
    assert device.dtype == exact.dtype == S.dtype
    assert torch.allclose(device, exact, atol=1e-6), (device - exact).abs().max()
    assert torch.isfinite(device_grad).all()
    scale = exact_grad.abs().max().clamp_min(1e-3)
    assert torch.allclose(device_grad, exact_grad, atol=1e-5 * scale), (device_grad - exact_grad).abs().max()


def chunk_state(tokens: int, rows: int, cols: int, batch: int = 4, seed: int = 0) -> torch.Tensor:
    """States as a chunk of `tokens` tokens makes them, Σ_t k_tᵀ v_t in fp32: rank min(tokens, rows, cols)."""
    rng = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(batch, tokens, rows, generator=rng), torch.randn(batch, tokens, cols, generator=rng)
    return keys.mT @ values


@pytest.mark.parametrize("shape", [(8, 8), (8, 6), (6, 8), (96, 96)])
def test_device_path_equals_the_exact_path_on_full_rank_states(shape):
    torch.manual_seed(0)
    assert_same(torch.randn(6, *shape))
    assert_same(chunk_state(512, *shape))


@pytest.mark.parametrize(
    ("tokens", "shape"), [(1, (8, 8)), (3, (8, 8)), (3, (8, 6)), (2, (6, 8)), (40, (96, 96)), (3, (96, 96))]
)
def test_device_path_equals_the_exact_path_on_rank_deficient_states(tokens, shape):
    """A chunk shorter than min(R1, R2) gives a state of rank `tokens`: repeated zero singular values, which both
    paths keep at zero (and whose gradient, NaN for the plain SVD, stays finite)."""
    S = chunk_state(tokens, *shape)
    assert_same(S)
    singular = torch.linalg.svdvals(normalize_state(S, config_for(S), method="device").double())
    assert torch.allclose(singular[..., :tokens], torch.ones_like(singular[..., :tokens]), atol=1e-6)
    assert singular[..., tokens:].max() < 1e-6


@pytest.mark.parametrize("rank", [1, 3])
def test_rank_1_and_3_products_of_8x8(rank):
    torch.manual_seed(0)
    S = (torch.randn(5, 8, rank, dtype=torch.float64) @ torch.randn(5, rank, 8, dtype=torch.float64)).float()
    assert_same(S)
    assert_same(torch.randn(5, 8, rank) @ torch.randn(5, rank, 8))  # products rounded in fp32 as well


def test_zero_state_gives_zero_adapter_and_zero_gradient():
    (exact, exact_grad), (device, device_grad) = both_paths(torch.zeros(3, 8, 8))
    assert torch.equal(device, torch.zeros(3, 8, 8)) and torch.equal(exact, device)
    assert torch.equal(device_grad, torch.zeros(3, 8, 8)) and torch.equal(exact_grad, device_grad)


def test_batched_states_of_mixed_rank_are_normalised_each_on_its_own():
    """(modules, rows, R1, R2), as AdapterGenerator.normalize stacks them: full-rank, rank-deficient and zero states
    in one batch, each normalised as if alone."""
    full, short, zero = chunk_state(64, 8, 8, batch=2), chunk_state(3, 8, 8, batch=2, seed=1), torch.zeros(2, 8, 8)
    S = torch.stack([torch.cat([full, short]), torch.cat([short, zero])])  # (2, 4, 8, 8)
    assert_same(S)
    config = config_for(S)
    together = normalize_state(S, config, method="device")
    alone = torch.stack([normalize_state(S[i, j], config, method="device") for i in range(2) for j in range(4)])
    assert torch.allclose(together.flatten(0, 1), alone, atol=1e-7)


def test_device_path_keeps_half_precision_out_of_the_normalisation():
    S = chunk_state(32, 8, 8).to(torch.bfloat16)
    out = normalize_state(S, config_for(S), method="device")
    assert out.dtype == torch.float32
    assert torch.allclose(out, normalize_state(S, config_for(S), method="exact"), atol=1e-6)


def test_device_backward_is_the_exact_gradient_without_truncation():
    torch.manual_seed(0)
    S = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    config = config_for(S)
    assert torch.autograd.gradcheck(lambda x: normalize_state(x, config, method="device"), (S,), eps=1e-6, atol=1e-5)


def test_truncated_rank_on_the_device_path_uses_the_exact_math_on_the_device():
    torch.manual_seed(0)
    assert_same(torch.randn(4, 8, 6), rank=4)
    assert_same(chunk_state(3, 8, 8), rank=5)


@pytest.mark.parametrize("size", [1, 6, 8, 32, 64, 96, 1024])
def test_the_cut_falls_at_the_exact_paths_tolerance(size):
    """Per singular value x of S / s (s ≥ σ₁), the device path computes a scalar map F (polar_map); the exact path
    keeps x > cut = size · eps(fp32). F(cut) = 1/2, and F is 0 or 1 (to 1e-7 / 1e-9) outside a narrow band."""
    cut = size * torch.finfo(torch.float32).eps
    schedule = polar_schedule(cut)
    assert 0.6 < schedule[0] <= 1  # the gain only ever scales down: singular values stay in [0, 1]
    assert polar_map(cut, schedule) == pytest.approx(0.5, abs=1e-9)
    assert polar_map(0.6 * cut, schedule) < 1e-7 and polar_map(0.95 * cut, schedule) < 0.5
    assert polar_map(1.05 * cut, schedule) > 0.5 and polar_map(1.6 * cut, schedule) > 1 - 1e-9
    kept = [polar_map(x, schedule) for x in (2 * cut, 30 * cut, 1e-2, 0.3, 0.58, 0.8, 0.99, 1.0)]
    assert min(kept) > 1 - 1e-9 and max(kept) < 1 + 1e-12


def test_spectral_upper_bound_is_an_upper_bound_within_its_factor():
    torch.manual_seed(0)
    S = torch.cat([torch.randn(4, 96, 96), chunk_state(2, 96, 96), torch.zeros(1, 96, 96)]).double()
    gram = S.mT @ S
    bound, largest = spectral_upper_bound(gram), torch.linalg.eigvalsh(gram)[..., -1]
    assert (bound >= largest * (1 - 1e-12)).all() and (bound <= largest * 96 ** (1 / 32) + 1e-300).all()
    assert bound[-1] == 0


def test_device_path_never_reads_a_value_on_the_host():
    """On meta tensors there are no values: any .item(), .cpu(), host copy or data-dependent branch would fail. The
    device path runs forward and backward there, so on a GPU it never waits for the device."""
    for rank in (96, 32):
        S = torch.empty(3, 2, 96, 96, device="meta", requires_grad=True)
        assert normalizer_for(S) == "device"
        out = normalize_state(S, tiny_config(key_dim=96, value_dim=96, rank=rank))
        out.sum().backward()
        assert out.shape == S.grad.shape == S.shape and out.device.type == "meta"


def test_cpu_tensors_keep_the_exact_path_unless_switched(monkeypatch):
    S = chunk_state(5, 8, 8)
    assert normalizer_for(S) == "exact"
    exact = _SVDNormalize.apply(S, 8, False)
    assert torch.equal(normalize_state(S, config_for(S)), exact)  # the shipped behaviour, bit for bit
    monkeypatch.setenv(NORMALIZER_ENV, "device")
    assert normalizer_for(S) == "device" and normalizer_for(S, "exact") == "exact"
    assert not torch.equal(normalize_state(S, config_for(S)), exact)
    assert torch.allclose(normalize_state(S, config_for(S)), exact, atol=1e-6)
    monkeypatch.setenv(NORMALIZER_ENV, "fast")
    with pytest.raises(GenAdapterError, match="normalizer must be one of"):
        normalize_state(S, config_for(S))


# The rest of a training step on a GPU does not wait for the device either (train/objectives.py, train/loop.py).


def test_row_means_find_each_values_row_without_reading_the_mask_on_the_host():
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(row_means(values, keep), torch.tensor([1.5, 0.0, 4.0, 6.0]))
    keep, values = torch.empty(3, 5, dtype=torch.bool, device="meta"), torch.empty(7, device="meta", requires_grad=True)
    row_means(values, keep).sum().backward()  # meta: no value can reach the host
    assert values.grad.shape == (7,)


def test_step_losses_reach_the_host_in_one_transfer_and_stop_at_the_first_bad_step(tmp_path):
    def step(index: int, loss: float, grad_norm: float = 1.0) -> tuple[int, str, dict[str, torch.Tensor]]:
        return index, "pretrain", {"grad_norm": torch.tensor(grad_norm), "loss": torch.tensor(loss)}

    good = host_losses([step(0, 2.0), step(1, 3.0, 0.5)], tmp_path / "checkpoint.pt")
    assert good == [("pretrain", {"grad_norm": 1.0, "loss": 2.0}), ("pretrain", {"grad_norm": 0.5, "loss": 3.0})]
    with pytest.raises(TrainingError, match="loss is nan at step 5; the last checkpoint"):
        host_losses([step(4, 1.0), step(5, float("nan")), step(6, float("nan"))], tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match="gradient norm is inf at step 7"):
        host_losses([step(7, 1.0, float("inf"))], tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("tokens", [64, 40])
def test_a_pretraining_step_gives_the_same_losses_and_gradients_on_either_path(monkeypatch, tokens):
    """The whole step on the tiny model (chunks of 16 tokens, 8 × 8 states; 40 tokens end on a short, rank-deficient
    chunk), once per path: the same losses and generator gradients."""
    ga = make_adapter()
    ga.generator.requires_grad_(True)
    ids = ga.tokenizer(TEXT_A, add_special_tokens=False)["input_ids"]
    config = TrainConfig(num_chunks=4, generator=ga.config.to_dict())
    results = []
    for method in ("exact", "device"):
        monkeypatch.setenv(NORMALIZER_ENV, method)
        ga.generator.zero_grad(set_to_none=True)
        losses = pretrain_losses(ga, [ids[:64], ids[64:128]], config, np.random.default_rng(0))
        instruct = context_adapters(ga, [[ids[:tokens]], [ids[:5]]])  # a 5-token context: rank 5 of 8
        (losses["loss"] + sum(v.sum() for v in instruct.values())).backward()
        grads = {name: p.grad.clone() for name, p in ga.generator.named_parameters() if p.grad is not None}
        results.append(({k: v.item() for k, v in losses.items()}, grads))
    (exact_losses, exact_grads), (device_losses, device_grads) = results
    assert device_losses == pytest.approx(exact_losses, rel=1e-6)
    assert exact_grads.keys() == device_grads.keys() and exact_grads
    for name, grad in exact_grads.items():
        assert torch.allclose(device_grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max()), name
