"""Triton chunkwise forward against the float64 recurrent definition (odd lengths, states, varlen)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm.ops import mlstm_chunkwise, mlstm_recurrent, resolve_backend
from fast_xlstm.ops.triton import mlstm_chunkwise_triton

# Relative error = max |err| / max |ref|, oracle in float64 on the same (rounded) inputs.
TOL = {torch.float32: 2e-4,  # fp32 math and exact ("ieee") fp32 dot products; observed <= 5e-5 (|n.q| cancellation)
       torch.bfloat16: 2e-2}  # bf16 tensor-core operands (P, chunk states), h rounded to bf16; observed ~6e-3
STATE_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DIMS = [(16, 32), (32, 16)]


def _oracle(x, s0):
    return mlstm_recurrent(*(t.double().cpu() for t in x), None if s0 is None else [t.double().cpu() for t in s0])


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("DK,DV", DIMS, ids=lambda d: str(d))
@pytest.mark.parametrize("S,chunk", [(1, 64), (63, 32), (65, 64), (150, 32)])
def test_forward_matches_recurrent(S, chunk, DK, DV, dtype, with_state, device, seed, make_inputs, random_state,
                                   rel_err, state_err):
    B, NH = 2, 2
    x = [t.to(device) for t in make_inputs(B, NH, S, DK, DV, dtype, seed=seed)]
    s0 = [t.to(device) for t in random_state(B, NH, DK, DV, torch.float32, seed=seed + 1)] if with_state else None
    h, st = mlstm_chunkwise_triton(*x, s0, chunk_size=chunk)
    h_ref, st_ref = _oracle(x, s0)
    assert h.dtype == dtype and h.shape == (B, NH, S, DV)
    # Inference writes h token-major, so the layer's output norm reads [B, S, NH * DV] rows in place.
    assert h.transpose(1, 2).is_contiguous()
    assert all(t.dtype == torch.float32 for t in st)
    eh, es = rel_err(h.cpu(), h_ref), state_err([t.cpu() for t in st], st_ref)
    assert eh < TOL[dtype], f"h error {eh:.2e}"
    assert es < STATE_TOL[dtype], f"state error {es:.2e}"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_state_dtype_follows_initial_state(state_dtype, device, seed, make_inputs, random_state, rel_err, state_err):
    B, NH, S, DK, DV = 1, 2, 20, 16, 16
    x = [t.to(device) for t in make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed)]
    s0 = [t.to(device, state_dtype) for t in random_state(B, NH, DK, DV, seed=seed + 1)]
    h, st = mlstm_chunkwise_triton(*x, s0)
    assert all(t.dtype == state_dtype for t in st)
    h_ref, st_ref = _oracle(x, s0)
    tol = STATE_TOL[state_dtype]
    assert rel_err(h.cpu(), h_ref) < tol and state_err([t.cpu() for t in st], st_ref) < tol


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_varlen_matches_sequences_one_by_one(dtype, with_state, device, seed, make_inputs, random_state, rel_err,
                                             state_err):
    offs = [0, 1, 40, 40, 73, 140]  # a length-1 sequence, an empty one, chunk-straddling lengths
    N, NH, DK, DV = len(offs) - 1, 2, 16, 32
    x = [t.to(device) for t in make_inputs(1, NH, offs[-1], DK, DV, dtype, seed=seed)]
    s0 = [t.to(device) for t in random_state(N, NH, DK, DV, seed=seed + 1)] if with_state else None
    cu = torch.tensor(offs, dtype=torch.int32, device=device)
    h, st = mlstm_chunkwise_triton(*x, s0, cu_seqlens=cu, chunk_size=32)
    assert h.shape == x[2].shape and st[0].shape == (N, NH, DK, DV)
    for r in range(N):
        a, e = offs[r], offs[r + 1]
        h_ref, st_ref = _oracle([t[:, :, a:e] for t in x], None if s0 is None else [t[r:r + 1] for t in s0])
        assert rel_err(h[:, :, a:e].cpu(), h_ref) < TOL[dtype], f"sequence {r}"
        assert state_err([t[r:r + 1].cpu() for t in st], st_ref) < STATE_TOL[dtype], f"sequence {r}"


def test_chained_calls_equal_one_call(device, seed, make_inputs, rel_err, state_err):
    B, NH, S, DK, DV = 2, 2, 100, 16, 16
    x = [t.to(device) for t in make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed)]
    h, st = mlstm_chunkwise_triton(*x)
    h1, st1 = mlstm_chunkwise_triton(*(t[:, :, :37] for t in x))
    h2, st2 = mlstm_chunkwise_triton(*(t[:, :, 37:] for t in x), st1)
    assert rel_err(torch.cat([h1, h2], 2), h) < 1e-5
    assert state_err(st2, st) < 1e-5


def test_skipped_positions_leave_state_untouched(device, seed, make_inputs, rel_err, state_err):
    """Positions with i = -inf, f = +inf (padding) neither add to nor decay the state."""
    B, NH, S, DK, DV = 1, 2, 50, 16, 16
    q, k, v, i, f = (t.to(device) for t in make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed))
    pad = 30
    i2 = torch.cat([i, torch.full((B, NH, pad), -math.inf, device=device)], -1)
    f2 = torch.cat([f, torch.full((B, NH, pad), math.inf, device=device)], -1)
    q2, k2, v2 = (torch.cat([t, torch.randn(B, NH, pad, t.shape[-1], device=device)], 2) for t in (q, k, v))
    h, st = mlstm_chunkwise_triton(q, k, v, i, f)
    h2, st2 = mlstm_chunkwise_triton(q2, k2, v2, i2, f2)
    assert rel_err(h2[:, :, :S], h) < 1e-6 and state_err(st2, st) < 1e-6


def test_noncontiguous_inputs_and_mixed_gate_dtype(device, seed, make_inputs, rel_err):
    B, NH, S, DK, DV = 2, 2, 33, 16, 16
    q, k, v, i, f = (t.to(device) for t in make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed))
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    h, _ = mlstm_chunkwise_triton(qt, k, v, i.double(), f.double())
    assert rel_err(h.cpu(), _oracle((q, k, v, i, f), None)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "varlen"])
def test_projection_views_equal_contiguous_inputs(packed, dtype, device, seed, make_inputs, random_state, rel_err,
                                                  state_err, pack_projection, unpack_projection):
    """q, k, v and gates as strided views of fused [B, S, NH * D] projections (read in place by the forward
    kernels) give exactly what contiguous copies give; dense B = 2 checks the batch stride too."""
    NH, DK, DV = 2, 16, 32
    offs = [0, 1, 40, 73, 90] if packed else None
    B, S = (1, offs[-1]) if packed else (2, 45)
    N = len(offs) - 1 if packed else B
    x = [t.to(device) for t in make_inputs(B, NH, S, DK, DV, dtype, seed=seed)]
    x[3:] = [t.float() for t in x[3:]]
    views = unpack_projection(*pack_projection(*x), NH, DK, DV)
    s0 = [t.to(device) for t in random_state(N, NH, DK, DV, torch.float32, seed=seed + 1)]
    cu = None if offs is None else torch.tensor(offs, dtype=torch.int32, device=device)
    h, st = mlstm_chunkwise_triton(*views, s0, cu_seqlens=cu, chunk_size=16)
    h_ref, st_ref = mlstm_chunkwise_triton(*x, s0, cu_seqlens=cu, chunk_size=16)
    assert torch.isfinite(h).all() and torch.equal(h, h_ref)
    assert all(torch.equal(a, b) for a, b in zip(st, st_ref))
    for r in range(N):  # and right (a stride bug shared by both calls would pass the above)
        a, e = (offs[r], offs[r + 1]) if packed else (0, S)
        b = 0 if packed else r
        h_or, st_or = _oracle([t[b:b + 1, :, a:e] for t in x], [t[r:r + 1] for t in s0])
        assert rel_err(h[b:b + 1, :, a:e].cpu(), h_or) < TOL[dtype], f"sequence {r}"
        assert state_err([t[r:r + 1].cpu() for t in st], st_or) < STATE_TOL[dtype], f"sequence {r}"


def test_strided_last_dim_is_copied(device, seed, make_inputs, rel_err):
    """A q whose last dim is not contiguous (which the kernels cannot read in place) still works."""
    B, NH, S, DK, DV = 1, 2, 33, 16, 16
    q, k, v, i, f = (t.to(device) for t in make_inputs(B, NH, S, DK, DV, torch.float32, seed=seed))
    qs = torch.stack([q, -q], -1)[..., 0]
    assert qs.stride(-1) == 2 and torch.equal(qs, q)
    h, _ = mlstm_chunkwise_triton(qs, k, v, i, f)
    assert torch.equal(h, mlstm_chunkwise_triton(q, k, v, i, f)[0])


def test_dispatch_routes_to_triton(device, seed, make_inputs, rel_err, no_backend_env):
    x = [t.to(device) for t in make_inputs(1, 2, 20, 16, 16, torch.float32, seed=seed)]
    assert resolve_backend(x[0]).name == "triton"
    assert resolve_backend(x[0].double()).name == "torch"  # the kernels compute in fp32: fp64 stays on torch
    h, _ = mlstm_chunkwise(*x, backend="triton")
    assert rel_err(h.cpu(), _oracle(x, None)[0]) < TOL[torch.float32]


def test_rejects_bad_input(device):
    q = torch.zeros(1, 2, 8, 16, device=device)
    v = torch.zeros(1, 2, 8, 16, device=device)
    g = torch.zeros(1, 2, 8, device=device)
    with pytest.raises(ValueError, match="k must have the shape of q"):
        mlstm_chunkwise_triton(q, q[..., :8], v, g, g)
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        mlstm_chunkwise_triton(q.double(), q.double(), v.double(), g, g)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        mlstm_chunkwise_triton(q, q, v, g, g, cu_seqlens=torch.tensor([0, 9], device=device))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        mlstm_chunkwise_triton(q, q, v, g, g, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_output_kernel_rows_from_gates_equal_the_states_kernels(dtype, device, seed, make_inputs, random_state):
    """The forward's output kernel derives each position's decay b and stabilizer m from the gates; the
    states kernel computes the same rows for the backward (WRITE_ROWS). Both must give the same h for
    packed sequences from initial states (the same arithmetic: bit-identical in the interpreter; a
    compiler may contract differently, hence the tolerance), and the states kernel the same chunk
    states with or without the rows."""
    from fast_xlstm.ops.triton import chunkwise_fwd
    from fast_xlstm.ops.triton._common import chunk_len, seq_tables

    offs = [0, 1, 40, 73, 140]  # a length-1 sequence and chunk-straddling lengths, packed in one row
    NH, DK, DV = 2, 16, 32
    q, k, v, i, f = (t.to(device) for t in make_inputs(1, NH, offs[-1], DK, DV, dtype, seed=seed))
    s0 = tuple(t.to(device) for t in random_state(len(offs) - 1, NH, DK, DV, torch.float32, seed=seed + 1))
    L = chunk_len(32, offs[-1])
    tabs = seq_tables(1, NH, offs[-1], L, offs, q.device)
    sd = chunkwise_fwd.chunk_state_dtype(dtype)
    with_rows = chunkwise_fwd.run_states(k, v, i, f, s0, tabs, L, sd)
    without = chunkwise_fwd.run_states(k, v, i, f, s0, tabs, L, sd, rows=False)
    assert without[4] is None and without[5] is None
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # (bf16: one rounding step of a stored value)
    for a, b in zip(with_rows[:3] + tuple(with_rows[3]), without[:3] + tuple(without[3])):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    CB, NB, MB, _, BROW, MROW = with_rows
    h_rows, d_rows = chunkwise_fwd.run_out(q, k, v, i, CB, NB, MB, BROW, MROW, tabs, L, 1e-6)
    h_gates, d_gates = chunkwise_fwd.run_out(q, k, v, i, CB, NB, MB, None, None, tabs, L, 1e-6, f=f)
    assert not torch.isnan(h_gates).any()
    for a, b in ((h_rows, h_gates), (d_rows, d_gates)):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    with pytest.raises(ValueError, match="forget gates"):
        chunkwise_fwd.run_out(q, k, v, i, CB, NB, MB, None, None, tabs, L, 1e-6)


def test_inference_chunk_length_follows_the_shape(device, seed, make_inputs, rel_err):
    """Inference on one sequence's heads of 4,096+ tokens takes 128-token chunks; two sequences, shorter
    input, small requested chunks and training keep the requested length. Both lengths compute the same h."""
    from fast_xlstm.ops.triton import autograd

    def L_for(B, NH, S, chunk=64, inference=True):
        x = [t.to(device) for t in make_inputs(B, NH, S, 16, 16, torch.float32, seed=seed)]
        return autograd._prepare(*x, None, None, None, None, chunk, contiguous=False, inference=inference)[-1]

    assert L_for(1, 8, 4096) == 128
    assert L_for(1, 8, 4096, inference=False) == 64
    assert L_for(2, 8, 4096) == 64
    assert L_for(1, 8, 4095) == 64
    assert L_for(1, 8, 4096, chunk=32) == 32
    cu = torch.tensor([0, 4096], dtype=torch.int32, device=device)
    x = [t.to(device) for t in make_inputs(1, 8, 4096, 16, 16, torch.float32, seed=seed)]
    assert autograd._prepare(*x, None, None, None, cu, 64, contiguous=False, inference=True)[-1] == 128

    x = [t.to(device) for t in make_inputs(1, 2, 300, 16, 16, torch.float32, seed=seed)]
    old = autograd.LONG_ALONE
    try:
        h64 = mlstm_chunkwise_triton(*x, chunk_size=64)[0]
        autograd.LONG_ALONE = 256  # this short input takes the long-input path
        h128 = mlstm_chunkwise_triton(*x, chunk_size=64)[0]
    finally:
        autograd.LONG_ALONE = old
    assert torch.isfinite(h128).all() and rel_err(h128, h64) < 1e-5
