"""Shared helpers for the mLSTM op tests (exposed as fixtures, so test modules never import conftest).

Inputs are drawn like the model sees them: q, k, v ~ N(0, 1) and gate pre-activations soft-capped as in
xLSTM 7B, 15 * tanh(x / 15), with x spread so that the gates vary (i from N(0, 3), f from N(3, 2)).
Every test gets its own reproducible seed derived from its node id.
"""

from __future__ import annotations

import zlib

import pytest
import torch


def softcap15(x: torch.Tensor) -> torch.Tensor:
    return 15.0 * torch.tanh(x / 15.0)


def _make_inputs(B: int, NH: int, S: int, DK: int, DV: int, dtype: torch.dtype = torch.float64, seed: int = 0,
                 i_mean: float = 0.0, i_std: float = 3.0, f_mean: float = 3.0, f_std: float = 2.0):
    """(q, k, v, i, f) for a [B, NH, S] batch: drawn in float64, then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = randn(B, NH, S, DK), randn(B, NH, S, DK), randn(B, NH, S, DV)
    i = softcap15(i_mean + i_std * randn(B, NH, S))
    f = softcap15(f_mean + f_std * randn(B, NH, S))
    return tuple(x.to(dtype) for x in (q, k, v, i, f))


def _random_state(N: int, NH: int, DK: int, DV: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    """A random (C, n, m) state: C, n ~ N(0, 1), m ~ U(-15, 15) (the stabilizer's range)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(N, NH, DK, DV, generator=g, dtype=torch.float64)
    n = torch.randn(N, NH, DK, generator=g, dtype=torch.float64)
    m = 30.0 * torch.rand(N, NH, 1, generator=g, dtype=torch.float64) - 15.0
    return tuple(x.to(dtype) for x in (C, n, m))


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| in float64; fails on NaN/inf (in either) and on a shape mismatch.

    Falls back to the absolute error where the reference is all zeros, and is 0 for empty tensors.
    """
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}"
    assert torch.isfinite(a).all(), f"non-finite values in result ({(~torch.isfinite(a)).sum().item()} of {a.numel()})"
    assert torch.isfinite(ref).all(), "non-finite values in reference"
    if a.numel() == 0:
        return 0.0
    a, ref = a.double(), ref.double()
    diff = (a - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff


def _state_err(st, ref) -> float:
    """The worst `rel_err` over the (C, n, m) components."""
    assert len(st) == 3 and len(ref) == 3
    return max(_rel_err(a, b) for a, b in zip(st, ref))


@pytest.fixture
def seed(request) -> int:
    """A reproducible per-test seed (differs across parametrizations)."""
    return zlib.crc32(request.node.nodeid.encode())


@pytest.fixture
def make_inputs():
    return _make_inputs


@pytest.fixture
def random_state():
    return _random_state


@pytest.fixture
def rel_err():
    return _rel_err


@pytest.fixture
def state_err():
    return _state_err


@pytest.fixture
def no_backend_env(monkeypatch):
    """Runs the test without a FAST_XLSTM_BACKEND override from the outside environment."""
    monkeypatch.delenv("FAST_XLSTM_BACKEND", raising=False)
