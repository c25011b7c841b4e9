"""Skipped (padding) positions and document resets.

A position with i = -inf and f = +inf must leave the state untouched; f = -25 with a large i wipes
the past (the training-time document reset).
"""

from __future__ import annotations

import math

import pytest
import torch

from fast_xlstm.ops import mlstm_chunkwise, mlstm_quadratic, mlstm_recurrent, mlstm_step

TOL = 1e-9  # float64
FORMS = {
    "recurrent": mlstm_recurrent,
    "quadratic": mlstm_quadratic,
    "chunkwise_L1": lambda *a: mlstm_chunkwise(*a, chunk_size=1, backend="torch"),
    "chunkwise_L16": lambda *a: mlstm_chunkwise(*a, chunk_size=16, backend="torch"),
    "chunkwise_L64": lambda *a: mlstm_chunkwise(*a, chunk_size=64, backend="torch"),
}


def _with_skips(i, f, skip):
    """Gates with skipped positions (`skip`, a bool [S] mask) set to i = -inf, f = +inf."""
    return i.masked_fill(skip, -math.inf), f.masked_fill(skip, math.inf)


def _keep(x, keep):
    return tuple(t[:, :, keep] for t in x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_skip_step_leaves_state_unchanged(dtype, seed, make_inputs, random_state):
    q, k, v, i, f = (t[:, :, 0] for t in make_inputs(2, 3, 1, 16, 8, dtype, seed=seed))
    s0 = random_state(2, 3, 16, 8, dtype, seed=seed + 1)
    i, f = torch.full_like(i, -math.inf), torch.full_like(f, math.inf)
    h, st = mlstm_step(q, k, v, i, f, s0, backend="torch")
    assert torch.isfinite(h).all()
    assert all(torch.equal(a, b) for a, b in zip(st, s0))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("S", [1, 40])
def test_all_skip_sequence_leaves_state_unchanged(form, S, seed, make_inputs, random_state):
    x = make_inputs(2, 2, S, 16, 8, seed=seed)
    i, f = _with_skips(x[3], x[4], torch.ones(S, dtype=torch.bool))
    s0 = random_state(2, 2, 16, 8, seed=seed + 1)
    h, st = FORMS[form](*x[:3], i, f, s0)
    assert torch.isfinite(h).all()
    assert all(torch.equal(a, b) for a, b in zip(st, s0))


def _skip_mask(S, pattern, seed):
    skip = torch.zeros(S, dtype=torch.bool)
    if pattern == "scattered":  # ~30% random positions, incl. the first and the last
        skip = torch.rand(S, generator=torch.Generator().manual_seed(seed)) < 0.3
        skip[[0, -1]] = True
    elif pattern == "first_chunk":
        skip[:16] = True
    elif pattern == "middle_chunk":
        skip[16:32] = True
    elif pattern == "tail":  # the last, partial chunk and a bit before it
        skip[60:] = True
    elif pattern == "long_run":  # more than a whole chunk, straddling chunk borders
        skip[10:45] = True
    return skip


@pytest.mark.parametrize("pattern", ["scattered", "first_chunk", "middle_chunk", "tail", "long_run"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("form", list(FORMS))
def test_interleaved_skips_equal_removed_positions(form, with_state, pattern, seed, make_inputs, random_state,
                                                   rel_err, state_err):
    """Skipped slots (with arbitrary q, k, v in them) change neither h elsewhere nor the final state."""
    B, NH, S, DK, DV = 2, 2, 70, 16, 8
    q, k, v, i, f = make_inputs(B, NH, S, DK, DV, seed=seed)
    skip = _skip_mask(S, pattern, seed)
    i, f = _with_skips(i, f, skip)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1) if with_state else None
    h, st = FORMS[form](q, k, v, i, f, s0)
    assert torch.isfinite(h).all(), "NaN/inf in h (skipped positions included)"
    h_ref, st_ref = mlstm_recurrent(*_keep((q, k, v, i, f), ~skip), s0)
    assert rel_err(h[:, :, ~skip], h_ref) < TOL
    assert state_err(st, st_ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["first_chunk", "middle_chunk", "tail"])
def test_skipped_chunks_low_precision_finite(pattern, dtype, seed, make_inputs, rel_err, state_err):
    """Whole chunks of skips in fp32/bf16 inputs (zero initial state): finite, and as if removed."""
    q, k, v, i, f = make_inputs(1, 2, 70, 16, 8, dtype, seed=seed)
    skip = _skip_mask(70, pattern, seed)
    i, f = _with_skips(i, f, skip)
    h, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=16, backend="torch")
    assert torch.isfinite(h).all() and all(torch.isfinite(t).all() for t in st)
    h_ref, st_ref = mlstm_recurrent(*(t.double() for t in _keep((q, k, v, i, f), ~skip)))
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert rel_err(h[:, :, ~skip], h_ref) < tol and state_err(st, st_ref) < 1e-3


@pytest.mark.parametrize("form", list(FORMS))
def test_document_reset_wipes_the_past(form, seed, make_inputs, random_state, rel_err, state_err):
    """f~ = -25 with a large i~ at position t: everything from t on is as if started from a zero state."""
    B, NH, S, DK, DV, t = 2, 2, 100, 16, 8, 60
    q, k, v, i, f = make_inputs(B, NH, S, DK, DV, seed=seed)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1)
    i, f = i.clone(), f.clone()
    i[:, :, t] = 15 * math.tanh(40 / 15)  # large (soft-capped) input gate
    h_fresh, st_fresh = mlstm_recurrent(*_keep((q, k, v, i, f), slice(t, None)))

    h_kept, _ = FORMS[form](q, k, v, i, f, s0)  # no reset: the past is still visible
    assert rel_err(h_kept[:, :, t:], h_fresh) > 1e-4

    f[:, :, t] = -25.0
    h, st = FORMS[form](q, k, v, i, f, s0)
    # The past survives with weight exp(-25 + m_{t-1} - m_t), where m_t = i~_t ~ 14.8 and m_{t-1} < 15.
    tol = 100 * math.exp(-25)
    assert rel_err(h[:, :, t:], h_fresh) < tol
    assert state_err(st, st_fresh) < tol
