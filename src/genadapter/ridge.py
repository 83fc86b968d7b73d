"""Ridge solves X = (G + P)⁻¹ Y on key sums G = Σ k kᵀ that add and subtract (the ridge write, the memory).

Why one place: a sum of states is positive semi-definite only up to rounding, and a subtraction of text that was
never absorbed leaves a G that is not positive semi-definite at all. Every solve goes through `solve_ridge`, which
falls back to the nearest positive semi-definite G, so every state add/subtract can reach gives an adapter.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nearest_psd(gram: Tensor) -> Tensor:
    """The positive semi-definite matrix nearest to a symmetric one (Frobenius norm): negative eigenvalues set to 0."""
    values, vectors = torch.linalg.eigh((gram + gram.mT) / 2)
    return (vectors * values.clamp_min(0).unsqueeze(-2)) @ vectors.mT


def solve_relative_ridge(
    gram: Tensor, rhs: Tensor, num_tokens: int | Tensor, strength: float, extra_prior: Tensor | None = None
) -> Tensor:
    """(G + μI + extra_prior)⁻¹ rhs in fp64, μ = `strength` times the mean key energy per token, tr(G) / n_tokens
    (n at least 1; μ at least 1e-12), and zero where no token was absorbed. num_tokens: an int, or one count per
    index of the dimension just before the matrices'."""
    gram = gram.double()
    tokens = torch.as_tensor(num_tokens, dtype=torch.float64, device=gram.device)
    mu = (strength * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / tokens.clamp_min(1)).clamp_min(1e-12)
    prior = mu[..., None, None] * torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
    if extra_prior is not None:
        prior = prior + extra_prior.to(device=gram.device, dtype=torch.float64)
    return solve_ridge(gram, prior, rhs) * (tokens > 0)[..., None, None]


def solve_ridge(gram: Tensor, prior: Tensor, rhs: Tensor) -> Tensor:
    """(G + prior)⁻¹ rhs in fp64: gram (..., k, k), prior (..., k, k) positive definite, rhs (..., k, m).

    Cholesky, since G + prior is symmetric positive definite for every G that is a sum of k kᵀ (batched LU solves
    also failed inside MKL — "DLASWP parameter 6" — once the eigh thread pool of generator.py had run); where a G is
    not positive semi-definite, its nearest one is solved with instead. Differentiable in gram and rhs."""
    gram, prior, rhs = gram.double(), prior.double(), rhs.double()
    factor, failed = torch.linalg.cholesky_ex(gram + prior)
    if bool(failed.any()):
        factor = torch.linalg.cholesky(nearest_psd(gram) + prior)
    return torch.cholesky_solve(rhs, factor)
