"""Fused decode step: functional form and the in-place slot pool, against the float64 step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.ops import mlstm_step, mlstm_step_torch
from fast_xlstm.ops.triton import mlstm_chunkwise_triton, mlstm_step_slots_, mlstm_step_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # fp32: elementwise fp32 math; bf16: rounding of h / state
DIMS = [(16, 32), (48, 80)]  # the second needs masked DK tiles and several DV tiles (shared n, m)


def _step_inputs(make_inputs, B, NH, DK, DV, dtype, seed, device):
    return [t[:, :, 0].to(device) for t in make_inputs(B, NH, 1, DK, DV, dtype, seed=seed)]


def _oracle(x, state):
    return mlstm_step_torch(*(t.double().cpu() for t in x),
                            None if state is None else [t.double().cpu() for t in state])


@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.bfloat16], ids=["no_state", "fp32", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_in", "bf16_in"])
@pytest.mark.parametrize("DK,DV", DIMS, ids=lambda d: str(d))
def test_functional_step(DK, DV, dtype, state_dtype, device, seed, make_inputs, random_state, rel_err, state_err):
    B, NH = 3, 2
    x = _step_inputs(make_inputs, B, NH, DK, DV, dtype, seed, device)
    s0 = None
    if state_dtype is not None:
        s0 = [t.to(device, state_dtype) for t in random_state(B, NH, DK, DV, seed=seed + 1)]
    h, st = mlstm_step_triton(*x, s0)
    h_ref, st_ref = _oracle(x, s0)
    assert h.dtype == dtype and all(t.dtype == (state_dtype or torch.float32) for t in st)
    assert rel_err(h.cpu(), h_ref) < TOL[dtype]
    assert state_err([t.cpu() for t in st], st_ref) < TOL[state_dtype or torch.float32]


POOLS = {"fp32_pool": (torch.float32,) * 3, "bf16_pool": (torch.bfloat16,) * 3,
         "bf16_C_fp32_nm": (torch.bfloat16, torch.float32, torch.float32)}


@pytest.mark.parametrize("pool_dtypes", list(POOLS.values()), ids=list(POOLS))
@pytest.mark.parametrize("DK,DV", DIMS, ids=lambda d: str(d))
def test_slot_pool_in_place(DK, DV, pool_dtypes, device, seed, make_inputs, random_state, rel_err, state_err):
    """Three steps on a pool through slots with skips: pool rows updated in place, skipped rows untouched."""
    NH, P = 2, 7
    slots = torch.tensor([5, -1, 0, 3, -1], dtype=torch.int32, device=device)
    B = slots.numel()
    pool = [t.to(device, d).contiguous() for t, d in zip(random_state(P, NH, DK, DV, seed=seed), pool_dtypes)]
    pool_dtype = pool_dtypes[0]
    ptrs = [t.data_ptr() for t in pool]
    start = [t.clone() for t in pool]
    ref = {s: [t[s:s + 1].clone() for t in pool] for s in slots.tolist() if s >= 0}
    for step in range(3):
        x = _step_inputs(make_inputs, B, NH, DK, DV, torch.bfloat16, seed + 10 + step, device)
        h = mlstm_step_slots_(*x, *pool, slots)
        assert h.shape == (B, NH, DV) and h.dtype == torch.bfloat16
        for b, s in enumerate(slots.tolist()):
            if s < 0:
                assert (h[b] == 0).all(), "a skipped row must give h = 0"
                continue
            h_ref, st_ref = mlstm_step_torch(*(t[b:b + 1].double().cpu() for t in x),
                                             [t.double().cpu() for t in ref[s]])
            ref[s] = [t.to(d) for t, d in zip(st_ref, pool_dtypes)]  # the pool rounds to its dtypes each step
            assert rel_err(h[b:b + 1].cpu(), h_ref) < TOL[torch.bfloat16]
            assert state_err([t[s:s + 1].cpu() for t in pool], st_ref) < TOL[pool_dtype], f"slot {s}, step {step}"
    assert [t.data_ptr() for t in pool] == ptrs
    untouched = [r for r in range(P) if r not in ref]
    for a, b in zip(pool, start):
        assert torch.equal(a[untouched], b[untouched]), "rows not in `slots` must not change"


def test_slot_pool_matches_functional_step_exactly(device, seed, make_inputs, random_state):
    NH, DK, DV, P = 2, 32, 64, 4
    slots = torch.tensor([2, 0], dtype=torch.int32, device=device)
    pool = [t.to(device).contiguous() for t in random_state(P, NH, DK, DV, seed=seed)]
    x = _step_inputs(make_inputs, 2, NH, DK, DV, torch.float32, seed, device)
    h_f, st_f = mlstm_step_triton(*x, [t[slots.long()] for t in pool])
    h_p = mlstm_step_slots_(*x, *pool, slots)
    assert torch.equal(h_f, h_p)
    assert all(torch.equal(a, b[slots.long()]) for a, b in zip(st_f, pool))


def test_slot_pool_reads_row_views_of_a_fused_projection(device, seed, make_inputs, random_state):
    """q, k, v and the gates as column slices of one [B, width] tensor (what the fused projections
    give the decode step) are read in place and give exactly what contiguous copies give."""
    B, NH, DK, DV, P = 3, 2, 16, 32, 5
    slots = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    x = _step_inputs(make_inputs, B, NH, DK, DV, torch.bfloat16, seed, device)
    q, k, v = (t.reshape(B, -1) for t in x[:3])
    fused = torch.cat([q, k, v, torch.randn(B, 7, device=device, dtype=torch.bfloat16)], 1)
    gates = torch.cat([x[3], x[4], torch.randn(B, 3, device=device)], 1)  # fp32, as the gate projection gives
    views = [fused[:, :NH * DK].view(B, NH, DK), fused[:, NH * DK:2 * NH * DK].view(B, NH, DK),
             fused[:, 2 * NH * DK:2 * NH * DK + NH * DV].view(B, NH, DV), gates[:, :NH], gates[:, NH:2 * NH]]
    assert not any(t.is_contiguous() for t in views)
    pools = [[t.to(device).contiguous() for t in random_state(P, NH, DK, DV, seed=seed + 1)] for _ in range(2)]
    h_views = mlstm_step_slots_(*views, *pools[0], slots)
    h_copies = mlstm_step_slots_(*(t.contiguous() for t in views), *pools[1], slots)
    assert torch.equal(h_views, h_copies)
    assert all(torch.equal(a, b) for a, b in zip(*pools))
    assert pools[0][0][4].abs().sum() > 0 and not torch.isnan(h_views).any()


def test_slot_pool_takes_packed_gates(device, seed, make_inputs, random_state):
    """The gates as one [B, 2NH] tensor (input gate first) and f None: exactly the separate-gate step,
    on the Triton kernel and on the torch twin."""
    B, NH, DK, DV, P = 3, 2, 16, 32, 5
    slots = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    q, k, v, i, f = _step_inputs(make_inputs, B, NH, DK, DV, torch.float32, seed, device)
    packed = torch.cat([i, f], 1)
    for backend in ("triton", "torch"):
        pools = [[t.to(device).contiguous() for t in random_state(P, NH, DK, DV, seed=seed + 1)] for _ in range(2)]
        h_sep = ops.mlstm_step_slots_(q, k, v, i, f, *pools[0], slots, backend=backend)
        h_packed = ops.mlstm_step_slots_(q, k, v, packed, None, *pools[1], slots, backend=backend)
        assert torch.equal(h_sep, h_packed) and not torch.isnan(h_packed).any()
        assert all(torch.equal(a, b) for a, b in zip(*pools))
    with pytest.raises(ValueError, match=r"packed gates \(i \| f\) of shape \[3, 4\]"):
        mlstm_step_slots_(q, k, v, i, None, *pools[0], slots)


def test_prefill_then_step_equals_longer_prefill(device, seed, make_inputs, rel_err, state_err):
    B, NH, S, DK, DV = 2, 2, 40, 16, 32
    x = [t.to(device) for t in make_inputs(B, NH, S + 1, DK, DV, torch.float32, seed=seed)]
    h_all, st_all = mlstm_chunkwise_triton(*x)
    _, st = mlstm_chunkwise_triton(*(t[:, :, :S] for t in x))
    h, st = mlstm_step(*(t[:, :, S] for t in x), st, backend="triton")
    assert rel_err(h, h_all[:, :, S]) < 1e-5 and state_err(st, st_all) < 1e-5


def test_step_rejects_bad_input(device):
    q, v = torch.zeros(2, 2, 16, device=device), torch.zeros(2, 2, 8, device=device)
    g = torch.zeros(2, 2, device=device)
    with pytest.raises(ValueError, match=r"step expects gates i, f of shape \[2, 2\]"):
        mlstm_step_triton(q, q, v, g[:, :1], g)
    pool = (torch.zeros(3, 2, 16, 8, device=device), torch.zeros(3, 2, 16, device=device),
            torch.zeros(3, 2, 1, device=device))
    with pytest.raises(ValueError, match=r"slots must be an int32 tensor of shape \[2\]"):
        mlstm_step_slots_(q, q, v, g, g, *pool, torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        mlstm_step_slots_(q, q, v, g, g, pool[0].transpose(-1, -2).contiguous().transpose(-1, -2), *pool[1:],
                          torch.zeros(2, dtype=torch.int32, device=device))


def test_step_custom_op_registrations(device, seed, make_inputs, random_state):
    """Schemas (incl. the in-place pool mutation) and fake kernels agree with the real ops."""
    NH, DK, DV = 2, 16, 32
    x = _step_inputs(make_inputs, 2, NH, DK, DV, torch.float32, seed, device)
    C, n, m = (t.to(device).contiguous() for t in random_state(3, NH, DK, DV, seed=seed))
    slots = torch.tensor([2, -1], dtype=torch.int32, device=device)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fast_xlstm.mlstm_step_slots_.default, (*x, C, n, m, slots, 1e-6), test_utils=tests)
    torch.library.opcheck(torch.ops.fast_xlstm.mlstm_step.default, (*x, C[:2], n[:2], m[:2], 1e-6), test_utils=tests)
    torch.library.opcheck(torch.ops.fast_xlstm.mlstm_step.default, (*x, None, None, None, 1e-6), test_utils=tests)


def test_dispatch_step_slots_routes_to_triton(device, seed, make_inputs, random_state, no_backend_env):
    from fast_xlstm import ops
    NH, DK, DV = 2, 16, 32
    x = _step_inputs(make_inputs, 2, NH, DK, DV, torch.float32, seed, device)
    pool = [t.to(device).contiguous() for t in random_state(3, NH, DK, DV, seed=seed)]
    ref = [t.clone() for t in pool]
    slots = torch.tensor([2, -1], dtype=torch.int32, device=device)
    assert ops.resolve_backend(x[0]).step_slots is not None
    h = ops.mlstm_step_slots_(*x, *pool, slots)
    h_ref = ops.mlstm_step_slots_(*x, *ref, slots, backend="torch")
    assert torch.allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(pool, ref))


@pytest.mark.parametrize("B,NH", [(1, 8), (4, 8), (5, 8)], ids=["b1", "b4", "b5"])
def test_slot_pool_at_7b_head_shape(B, NH, device, seed, make_inputs, random_state, rel_err, state_err):
    """The 7B's heads (DK 256, DV 512) with the tiles decode uses at that batch: up to batch 4 one
    load of each program's whole DK column, from batch 5 64 x 64 tiles over DK."""
    from fast_xlstm.ops.triton.step import _tiles

    DK, DV = 256, 512
    assert _tiles(B, NH, DK, DV) == ((256, 32, 4) if B <= 4 else (64, 64, 4))
    slots = torch.arange(B, dtype=torch.int32, device=device).flip(0)
    pool = [t.to(device).contiguous() for t in random_state(B, NH, DK, DV, seed=seed)]
    x = _step_inputs(make_inputs, B, NH, DK, DV, torch.bfloat16, seed, device)
    order = slots.long().cpu()
    h_ref, st_ref = mlstm_step_torch(*(t.double().cpu() for t in x), [t.double().cpu()[order] for t in pool])
    h = mlstm_step_slots_(*x, *pool, slots)
    assert rel_err(h.cpu(), h_ref) < TOL[torch.bfloat16]
    assert state_err([t.cpu()[order] for t in pool], st_ref) < TOL[torch.float32]


def test_step_tiles_sweep_agrees_across_tiles(device):
    """bench/step_tiles_sweep.py runs (in the interpreter on CPU), and every tiling it tries gives the
    chosen tiling's h and state up to summation order."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "bench" / "step_tiles_sweep.py"
    spec = importlib.util.spec_from_file_location("step_tiles_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.sweep([1, 3], 2, 64, 64, torch.device(device))
    assert {r["batch"] for r in rows} == {1, 3} and sum(r["chosen"] for r in rows) == 2
    assert len(rows) > 2 and all(r["max_rel_diff_vs_chosen"] < 1e-2 for r in rows)
