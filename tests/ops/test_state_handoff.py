"""State hand-off: chained calls, decode steps and packed variable-length sequences."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm.ops import mlstm_chunkwise, mlstm_recurrent, mlstm_step

TOL = 1e-9  # float64


def _cut(x, a, e):
    return tuple(t[:, :, a:e] for t in x)


@pytest.mark.parametrize("cuts", [[0, 64, 130], [0, 50, 97, 130], [0, 1, 129, 130]], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("form", ["chunkwise", "recurrent", "chunkwise+step"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
def test_chained_calls_equal_one_call(cuts, form, with_state, seed, make_inputs, random_state, rel_err, state_err):
    B, NH, DK, DV = 2, 2, 16, 8
    x = make_inputs(B, NH, cuts[-1], DK, DV, seed=seed)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1) if with_state else None
    h_ref, st_ref = mlstm_recurrent(*x, s0)

    hs, st = [], s0
    for n_piece, (a, e) in enumerate(zip(cuts, cuts[1:])):
        piece = _cut(x, a, e)
        if form == "recurrent":
            h, st = mlstm_recurrent(*piece, st)
        elif form == "chunkwise" or n_piece == 0:  # "chunkwise+step": prefill, then decode one by one
            h, st = mlstm_chunkwise(*piece, st, chunk_size=16, backend="torch")
        else:
            steps = []
            for t in range(e - a):
                ht, st = mlstm_step(*(u[:, :, t] for u in piece), st, backend="torch")
                steps.append(ht)
            h = torch.stack(steps, 2)
        hs.append(h)
    assert rel_err(torch.cat(hs, 2), h_ref) < TOL
    assert state_err(st, st_ref) < TOL


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
def test_steps_equal_recurrent(with_state, seed, make_inputs, random_state, rel_err, state_err):
    B, NH, S, DK, DV = 2, 3, 40, 16, 32
    x = make_inputs(B, NH, S, DK, DV, seed=seed)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1) if with_state else None
    h_ref, st_ref = mlstm_recurrent(*x, s0)
    st, hs = s0, []
    for t in range(S):
        h, st = mlstm_step(*(u[:, :, t] for u in x), st, backend="torch")
        assert h.shape == (B, NH, DV)
        hs.append(h)
    assert rel_err(torch.stack(hs, 2), h_ref) < TOL
    assert state_err(st, st_ref) < TOL


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
def test_packed_varlen_equals_separate_runs(chunk_size, with_state, seed, make_inputs, random_state, rel_err,
                                            state_err):
    NH, DK, DV = 2, 16, 8
    lengths = [5, 0, 1, 70, 16, 33, 0]  # empty, single and ragged sequences; an empty one last
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    S, N = offs[-1], len(lengths)
    x = make_inputs(1, NH, S, DK, DV, seed=seed)
    s0 = random_state(N, NH, DK, DV, seed=seed + 1) if with_state else None
    cu = torch.tensor(offs, dtype=torch.int32)

    h, st = mlstm_chunkwise(*x, s0, cu_seqlens=cu, chunk_size=chunk_size, backend="torch")
    assert h.shape == (1, NH, S, DV)
    assert [t.shape[0] for t in st] == [N, N, N]
    for r, (a, e) in enumerate(zip(offs, offs[1:])):
        s_r = None if s0 is None else tuple(t[r:r + 1] for t in s0)
        h_r, st_r = mlstm_recurrent(*_cut(x, a, e), s_r)
        assert rel_err(h[:, :, a:e], h_r) < TOL, f"sequence {r} (length {e - a}): h"
        assert state_err(tuple(t[r:r + 1] for t in st), st_r) < TOL, f"sequence {r} (length {e - a}): state"
        if a == e and s0 is not None:  # an empty sequence hands its initial state straight back
            assert all(torch.equal(t[r], u[r]) for t, u in zip(st, s0))


def test_packed_equal_lengths_equals_batch(seed, make_inputs, random_state, rel_err, state_err):
    """N packed sequences of one length give what a batch of N gives."""
    N, NH, S, DK, DV = 3, 2, 45, 8, 8
    x = make_inputs(N, NH, S, DK, DV, seed=seed)
    s0 = random_state(N, NH, DK, DV, seed=seed + 1)
    h_ref, st_ref = mlstm_chunkwise(*x, s0, chunk_size=16, backend="torch")
    packed = tuple(t.transpose(0, 1).reshape(1, NH, N * S, *t.shape[3:]) for t in x)
    cu = torch.arange(0, N * S + 1, S, dtype=torch.int64)
    h, st = mlstm_chunkwise(*packed, s0, cu_seqlens=cu, chunk_size=16, backend="torch")
    h = h.reshape(NH, N, S, DV).transpose(0, 1)
    assert rel_err(h, h_ref) < TOL and state_err(st, st_ref) < TOL
