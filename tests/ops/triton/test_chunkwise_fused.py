"""The one-kernel inference forward (`chunkwise_fused`) against the two-kernel forward and the float64
recurrence: dense and packed input, initial states from a pool, final states into the pool with several
DV-tile programs per head (the n, m ticket) and the planned layout's padding sequences."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm.ops import mlstm_recurrent
from fast_xlstm.ops.triton import PackedLayout, PackedPlan, mlstm_chunkwise_planned, mlstm_chunkwise_triton
from fast_xlstm.ops.triton import padded_rows, plan_values
from fast_xlstm.ops.triton._common import seq_tables
from fast_xlstm.ops.triton.chunkwise_fused import _cfgs, mlstm_chunkwise_fwd_fused
from fast_xlstm.ops.triton.chunkwise_fwd import mlstm_chunkwise_fwd

# Against the two-kernel forward: the same arithmetic but for the summation order inside the products
# (the output kernel sums q.C over DK tiles); bf16 h can round one ulp the other way (2^-8 relative).
TWIN_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}
ORACLE_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-2}  # as test_chunkwise_fwd's
DV_WIDE = 96  # three 32-wide DV tiles per head for few sequence-heads: the n, m ticket has several holders


def test_narrow_tiles_for_few_sequence_heads():
    """The tests below rely on several DV-tile programs per head at these sizes."""
    assert _cfgs(16, DV_WIDE, 4)[0]["BV"] == 32 and _cfgs(256, 512, 64)[0]["BV"] == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "random_state"])
def test_fused_matches_two_kernel_forward_and_recurrence(dtype, packed, with_state, device, seed, make_inputs,
                                                         random_state, rel_err, state_err):
    NH, DK, DV, L = 2, 16, DV_WIDE, 16
    if packed:
        offs = [0, 1, 40, 40, 73, 101]  # length 1, an empty sequence, chunk-straddling lengths
        B, S, N = 1, offs[-1], len(offs) - 1
    else:
        offs, B, S = None, 2, 45
        N = B
    x = [t.to(device) for t in make_inputs(B, NH, S, DK, DV, dtype, seed=seed)]
    init = tuple(t.to(device) for t in random_state(N, NH, DK, DV, torch.float32, seed=seed + 1)) if with_state else None
    tabs = seq_tables(B, NH, S, L, offs, device)
    h, (C, n, m) = mlstm_chunkwise_fwd_fused(*x, init, tabs, L, 1e-6, token_major=True)
    h2, (C2, n2, m2), _ = mlstm_chunkwise_fwd(*x, init, tabs, L, 1e-6)
    assert h.transpose(1, 2).is_contiguous() and h.dtype == dtype
    assert rel_err(h.cpu(), h2.cpu()) < TWIN_TOL[dtype]
    assert state_err([C.cpu(), n.cpu(), m.cpu()], [C2.cpu(), n2.cpu(), m2.cpu()]) < TWIN_TOL[dtype]
    spans = [(0, S)] * B if offs is None else list(zip(offs, offs[1:]))
    for r, (a, e) in enumerate(spans):
        b = 0 if packed else r
        s0 = None if init is None else [t[r:r + 1].double().cpu() for t in init]
        h_ref, st_ref = mlstm_recurrent(*(t[b:b + 1, :, a:e].double().cpu() for t in x), s0)
        assert rel_err(h[b:b + 1, :, a:e].cpu(), h_ref) < ORACLE_TOL[dtype], f"sequence {r}"
        assert state_err([C[r:r + 1].cpu(), n[r:r + 1].cpu(), m[r:r + 1, :, None].cpu()], st_ref) \
            < ORACLE_TOL[dtype], f"sequence {r}"


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
def test_final_states_into_the_pool_with_padding(pool_dtype, device, seed, make_inputs, random_state):
    """Planned layout with two padding sequences, three DV tiles per head: each real sequence's final state
    lands in its pool row (C from every tile, n and m from the last ticket holder), the padding (which
    repeats a real sequence's row) does not advance it a second time, other rows stay, and the tickets
    are left at zero (a second call gives the chained result)."""
    NH, DK, DV, T, P = 2, 16, DV_WIDE, 64, 7
    layout = PackedLayout(5, T, chunk_size=16)
    offs = [0, 21, 30, 55]  # the shortest (9 tokens) is repeated by the padding
    N = len(offs) - 1
    real = [5, 0, 3]
    rows = torch.tensor(padded_rows(layout, offs, real), dtype=torch.long, device=device)
    plan = PackedPlan.from_buffer(layout, torch.tensor(plan_values(layout, offs), dtype=torch.long, device=device))
    pool = [t.to(device, pool_dtype) for t in random_state(P, NH, DK, DV, seed=seed + 1)]
    before = [t.clone() for t in pool]
    x = [t.to(device) for t in make_inputs(1, NH, T, DK, DV, torch.float32, seed=seed)]
    _, finals = mlstm_chunkwise_planned(*x, pool, plan, state_rows=rows)  # returned, the pool untouched
    assert all(torch.equal(a, b) for a, b in zip(pool, before))
    h, none = mlstm_chunkwise_planned(*x, pool, plan, state_rows=rows, final_to_pool=True)
    assert none is None
    for row in range(P):
        for t, t0, fin in zip(pool, before, finals):
            want = fin[real.index(row)].to(pool_dtype) if row in real else t0[row]
            assert torch.equal(t[row], want), f"pool row {row}"
    # The tickets were reset: a second prefill from the written rows continues each sequence.
    h2, _ = mlstm_chunkwise_planned(*x, pool, plan, state_rows=rows, final_to_pool=True)
    for r in range(N):
        a, e = offs[r], offs[r + 1]
        s0 = [t[real[r]:real[r] + 1].double().cpu() for t in before]
        seq = [t[:, :, a:e].double().cpu() for t in x]
        _, st1 = mlstm_recurrent(*seq, s0)
        st1 = [s.to(pool_dtype).double() for s in st1]  # the pool's rounding between the two calls
        h_ref, st_ref = mlstm_recurrent(*seq, st1)
        tol = ORACLE_TOL[torch.float32 if pool_dtype == torch.float32 else torch.bfloat16]
        assert _rel(h2[:, :, a:e].cpu(), h_ref) < tol, f"sequence {r}"
        for t, ref in zip(pool, st_ref):
            assert _rel(t[real[r]:real[r] + 1].cpu(), ref) < tol, f"sequence {r} state"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(a).all()
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def test_env_selects_the_two_kernel_forward(device, seed, make_inputs, monkeypatch, rel_err):
    """FAST_XLSTM_FUSED_FWD=0 runs the two-kernel forward (kept for comparison), with the same results."""
    x = [t.to(device) for t in make_inputs(1, 2, 50, 16, 32, torch.float32, seed=seed)]
    calls = []
    import fast_xlstm.ops.triton.chunkwise_fused as fused_mod
    real = fused_mod.mlstm_chunkwise_fwd_fused
    monkeypatch.setattr(fused_mod, "mlstm_chunkwise_fwd_fused", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    h1, st1 = mlstm_chunkwise_triton(*x, chunk_size=16)
    assert calls == [1]
    monkeypatch.setenv("FAST_XLSTM_FUSED_FWD", "0")
    h0, st0 = mlstm_chunkwise_triton(*x, chunk_size=16)
    assert calls == [1]
    assert rel_err(h1.cpu(), h0.cpu()) < TWIN_TOL[torch.float32]
    assert all(rel_err(a.cpu(), b.cpu()) < TWIN_TOL[torch.float32] for a, b in zip(st1, st0))
