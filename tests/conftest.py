"""Pytest fixtures over the tiny random models of `genadapter.testing`."""

from __future__ import annotations

import pytest
import torch

from genadapter import GenerativeAdapter
from genadapter.testing import (  # noqa: F401  (re-exported: tests import them from conftest)
    TEXT_A,
    TEXT_B,
    make_adapter,
    make_model,
    make_tokenizer,
    randomize_b,
    save_tiny_dirs,
    tiny_config,
)

# Tiny models gain nothing from threads, and oversubscribed OpenMP threads stall a 2-core machine.
torch.set_num_threads(1)

MEMORY = {"memory_layers": 1, "memory_keys": 8, "memory_scale": 2.0}  # next-token memory in the last tiny layer


RIDGE = {"normalization": "ridge"}  # the least-squares write: G = Σ KᵀK in the state


@pytest.fixture(params=[{}, MEMORY, RIDGE], ids=["generator", "with-memory", "ridge"])
def ga(request) -> GenerativeAdapter:
    return make_adapter(**request.param)


@pytest.fixture
def tiny_dirs(tmp_path):
    return save_tiny_dirs(tmp_path)
