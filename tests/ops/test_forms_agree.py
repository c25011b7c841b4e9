"""The recurrent, quadratic and chunkwise forms of the mLSTM cell compute the same function."""

from __future__ import annotations

import importlib

import pytest
import torch

from fast_xlstm.ops import mlstm_chunkwise, mlstm_quadratic, mlstm_recurrent

TOL_FP64 = 1e-9  # float64 forms agree to rounding (observed ~1e-12)
TOL_FP32 = 1e-3  # float32 vs float64 oracle on the same (rounded) inputs (observed ~1e-4: |n.q| cancellation)
TOL_BF16 = 2e-2  # bf16 inputs, fp32 math, h rounded to bf16 (2^-8 per element)

LENGTHS = [1, 2, 63, 64, 65, 200]
DIMS = [(8, 16), (16, 16), (32, 8)]
CHUNKS = [1, 16, 48, 64]  # 48 divides none of 63, 64, 65, 200; 64 > 63 and 64 < 65


def _all_forms(x, state, chunks=CHUNKS):
    out = {"quadratic": mlstm_quadratic(*x, state)}
    for L in chunks:
        out[f"chunkwise_L{L}"] = mlstm_chunkwise(*x, state, chunk_size=L, backend="torch")
    return out


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("DK,DV", DIMS, ids=lambda d: str(d))
@pytest.mark.parametrize("S", LENGTHS)
def test_forms_agree_fp64(S, DK, DV, with_state, seed, make_inputs, random_state, rel_err, state_err):
    B, NH = 2, 3
    x = make_inputs(B, NH, S, DK, DV, seed=seed)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1) if with_state else None
    h_ref, st_ref = mlstm_recurrent(*x, s0)
    assert h_ref.shape == (B, NH, S, DV)
    errs = {name: (rel_err(h, h_ref), state_err(st, st_ref)) for name, (h, st) in _all_forms(x, s0).items()}
    bad = {name: e for name, e in errs.items() if max(e) > TOL_FP64}
    assert not bad, f"(h, state) relative errors above {TOL_FP64}: {bad}"


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("S", [64, 200])
def test_fp32_matches_fp64_oracle(S, with_state, seed, make_inputs, random_state, rel_err, state_err):
    B, NH, DK, DV = 2, 2, 32, 16
    x32 = make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed)
    s32 = random_state(B, NH, DK, DV, torch.float32, seed=seed + 1) if with_state else None
    # The oracle sees exactly the float32 values, so only the float32 arithmetic is measured.
    h_ref, st_ref = mlstm_recurrent(*(t.double() for t in x32), None if s32 is None else [t.double() for t in s32])
    forms = _all_forms(x32, s32, chunks=[16, 48, 64])
    forms["recurrent"] = mlstm_recurrent(*x32, s32)
    for name, (h, st) in forms.items():
        assert h.dtype == torch.float32 and all(t.dtype == torch.float32 for t in st), name
        eh, es = rel_err(h, h_ref), state_err(st, st_ref)
        assert eh < TOL_FP32 and es < TOL_FP32, f"{name}: h error {eh:.2e}, state error {es:.2e} (tol {TOL_FP32})"


def test_bf16_inputs_match_oracle(seed, make_inputs, rel_err, state_err):
    B, NH, S, DK, DV = 1, 2, 100, 32, 32
    x16 = make_inputs(B, NH, S, DK, DV, torch.bfloat16, seed=seed)
    h_ref, st_ref = mlstm_recurrent(*(t.double() for t in x16))
    h, st = mlstm_chunkwise(*x16, chunk_size=32, backend="torch")
    assert h.dtype == torch.bfloat16 and st[0].dtype == torch.float32
    assert rel_err(h, h_ref) < TOL_BF16
    assert state_err(st, st_ref) < TOL_FP32  # the state stays fp32, computed from the bf16 values


def test_chunkwise_many_segments(monkeypatch, seed, make_inputs, random_state, rel_err, state_err):
    """Chunks processed one segment at a time (the memory cap) give the same result."""
    cw = importlib.import_module("fast_xlstm.ops.chunkwise_torch")
    x = make_inputs(2, 2, 90, 16, 8, seed=seed)
    s0 = random_state(2, 2, 16, 8, seed=seed + 1)
    h_ref, st_ref = mlstm_recurrent(*x, s0)
    monkeypatch.setattr(cw, "_SEGMENT_STATE_BYTES", 1)  # one chunk per segment
    h, st = mlstm_chunkwise(*x, s0, chunk_size=16, backend="torch")
    assert rel_err(h, h_ref) < TOL_FP64 and state_err(st, st_ref) < TOL_FP64


@pytest.mark.parametrize("S", [0, 1])
def test_tiny_lengths(S, seed, make_inputs, random_state, rel_err, state_err):
    x = make_inputs(2, 2, S, 8, 4, seed=seed)
    s0 = random_state(2, 2, 8, 4, seed=seed + 1)
    h_ref, st_ref = mlstm_recurrent(*x, s0)
    for name, (h, st) in _all_forms(x, s0, chunks=[1, 64]).items():
        assert h.shape == (2, 2, S, 4), name
        assert rel_err(h, h_ref) < TOL_FP64 and state_err(st, st_ref) < TOL_FP64, name
    if S == 0:
        assert all(torch.equal(a, b) for a, b in zip(st_ref, s0))


@pytest.mark.parametrize("with_skips", [False, True])
def test_chunkwise_gradients_match_recurrent(with_skips, seed, make_inputs, random_state, rel_err):
    """Autograd through the chunkwise form (ragged tail included) equals autograd through the definition."""
    B, NH, S, DK, DV = 1, 2, 37, 8, 8
    q, k, v, i, f = make_inputs(B, NH, S, DK, DV, seed=seed)
    if with_skips:  # padding masked as the model would (torch.where); only unmasked gate grads are compared
        skip = torch.zeros(S, dtype=torch.bool)
        skip[[0, 5, 6, 36]] = True
        skip[16:32] = True  # a whole chunk
        i = torch.where(skip, torch.tensor(-torch.inf, dtype=i.dtype), i)
        f = torch.where(skip, torch.tensor(torch.inf, dtype=f.dtype), f)
    s0 = random_state(B, NH, DK, DV, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    w_h = torch.randn(B, NH, S, DV, generator=g, dtype=torch.float64)
    w_C = torch.randn(B, NH, DK, DV, generator=g, dtype=torch.float64)
    w_n = torch.randn(B, NH, DK, generator=g, dtype=torch.float64)

    def grads(fn):
        ins = [t.clone().requires_grad_() for t in (q, k, v, i, f, *s0)]
        h, (C, n, m) = fn(*ins[:5], tuple(ins[5:]))
        # C, n are only meaningful together with m: weigh them by exp(m) (the unstabilized state)
        loss = (h * w_h).sum() + (C * m.exp().unsqueeze(-1) * w_C).sum() * 1e-6 + (n * m.exp() * w_n).sum() * 1e-6
        loss.backward()
        return [t.grad for t in ins]

    g_ref = grads(mlstm_recurrent)
    g_cw = grads(lambda *a: mlstm_chunkwise(*a, chunk_size=16, backend="torch"))
    names = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]
    for name, a, b in zip(names, g_cw, g_ref):
        if with_skips and name in ("i", "f"):
            a, b = a[..., ~skip], b[..., ~skip]
        assert rel_err(a, b) < 1e-8, f"gradient of {name}"
