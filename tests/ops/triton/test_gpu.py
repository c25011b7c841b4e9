"""The Triton kernels at the xLSTM 7B head shapes (NH 8, DK 256, DV 512) on a CUDA device.

Run with `pytest -m gpu tests/ops/triton` (scripts/gpu_kernel_check.sh). The oracle is the float64
torch chunkwise form on the GPU (itself tested equal to the recurrent definition), fed the same rounded
inputs. Errors are max |err| / max |ref|; NaN or inf fails (the `rel_err` fixture).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm.ops import mlstm_chunkwise_torch, mlstm_step_torch
from fast_xlstm.ops.triton import mlstm_chunkwise_triton, mlstm_step_slots_

# FAST_XLSTM_GPU_TESTS_ON_CPU=1 dry-runs this file's logic in the CPU interpreter at tiny sizes.
DRY = os.environ.get("FAST_XLSTM_GPU_TESTS_ON_CPU") == "1"
DEV = "cpu" if DRY else "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (DRY or torch.cuda.is_available()), reason="needs a CUDA device")]

NH, DK, DV = (2, 16, 32) if DRY else (8, 256, 512)


def _len(S: int) -> int:
    return min(S, 150) if DRY else S


FWD_TOL = {torch.float32: 1e-3,  # fp32 states, exact fp32 products; |n.q| cancellation at rare rows
           torch.bfloat16: 2e-2}  # bf16 products and chunk-start states, h rounded to bf16
BWD_TOL = {torch.float32: 2e-3, torch.bfloat16: 6e-2}
STEP_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _inputs(B, S, dtype, seed, requires_grad=False):
    """q, k, v ~ N(0, 1); gates soft-capped like the 7B's (as tests/ops/conftest.py), made on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device=DEV)
    q, k, v = rn(B, NH, S, DK).to(dtype), rn(B, NH, S, DK).to(dtype), rn(B, NH, S, DV).to(dtype)
    i = 15 * torch.tanh(3 * rn(B, NH, S) / 15)
    f = 15 * torch.tanh((3 + 2 * rn(B, NH, S)) / 15)
    return [t.requires_grad_(requires_grad) for t in (q, k, v, i, f)]


def _state(N, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(N, NH, DK, DV, generator=g, device=DEV), torch.randn(N, NH, DK, generator=g, device=DEV),
            30 * torch.rand(N, NH, 1, generator=g, device=DEV) - 15)


def _oracle(x, s0, cu=None):
    with torch.no_grad():
        return mlstm_chunkwise_torch(*(t.double() for t in x), None if s0 is None else [t.double() for t in s0],
                                     cu_seqlens=cu, chunk_size=64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("S", [1, 63, 65, 1000, 8192, 65536])
def test_forward_7b_shapes(S, dtype, rel_err, state_err):
    x = _inputs(1, _len(S), dtype, seed=S)
    h, st = mlstm_chunkwise_triton(*x)
    h_ref, st_ref = _oracle(x, None)
    eh, es = rel_err(h, h_ref), state_err(st, st_ref)
    assert eh < FWD_TOL[dtype] and es < FWD_TOL[dtype], f"h {eh:.2e}, state {es:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_forward_7b_batch_with_states(dtype, rel_err, state_err):
    x = _inputs(3, _len(4096), dtype, seed=1)
    s0 = _state(3, seed=2)
    h, st = mlstm_chunkwise_triton(*x, s0, chunk_size=128)
    h_ref, st_ref = _oracle(x, s0)
    assert rel_err(h, h_ref) < FWD_TOL[dtype] and state_err(st, st_ref) < FWD_TOL[dtype]


def test_varlen_7b(rel_err, state_err):
    cu = [0, 1, 3000, 3001, 3001, 8192] if not DRY else [0, 1, 70, 71, 71, 150]
    x = _inputs(1, cu[-1], torch.bfloat16, seed=3)
    cu = torch.tensor(cu, dtype=torch.int32, device=DEV)
    s0 = _state(5, seed=4)
    h, st = mlstm_chunkwise_triton(*x, s0, cu_seqlens=cu)
    h_ref, st_ref = _oracle(x, s0, cu)
    assert rel_err(h, h_ref) < FWD_TOL[torch.bfloat16] and state_err(st, st_ref) < FWD_TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("S", [1000, 16384, 65536])
def test_backward_7b_shapes(S, dtype, rel_err):
    B = 1
    x = _inputs(B, _len(S), dtype, seed=S + 5, requires_grad=True)
    s0 = [t.requires_grad_() for t in _state(B, seed=6)]
    h, st = mlstm_chunkwise_triton(*x, s0)
    g = torch.Generator(device=DEV).manual_seed(7)
    w = [torch.randn(t.shape, generator=g, device=DEV, dtype=torch.float64) for t in (h, *st)]
    sum((t.double() * wt).sum() for t, wt in zip((h, *st), w)).backward()
    grads = [t.grad for t in (*x, *s0)]

    xr = [t.detach().double().requires_grad_() for t in (*x, *s0)]
    # The fp64 oracle's autograd keeps every chunk-start state: 256-token chunks keep 65k within the card.
    hr, str_ = mlstm_chunkwise_torch(*xr[:5], xr[5:], chunk_size=64 if S <= 16384 else 256)
    sum((t * wt).sum() for t, wt in zip((hr, *str_), w)).backward()
    names = ["q", "k", "v", "i", "f", "C0", "n0", "m0"]
    # bf16 at 65k: max/max of dq, dk is set by the single worst-conditioned row (a normalizer |n.q| that
    # nearly cancels makes h and those gradients large there, and bf16 products cannot resolve it): 0.18 /
    # 0.21 at 65,536 against 3e-3 at 16,384, with the same per-row error distribution at both lengths
    # (median 5e-3 / 4e-3, p99 0.19 / 0.03: bench/bwd_error_profile.py, bench/results/h100-kernels-1fa9942;
    # mlstm_kernels' limit_chunk: median 1.1 / 0.95 on the same inputs). There they are held to per-row
    # quantiles instead; every other gradient keeps the max/max bound.
    by_rows = {"q", "k"} if (dtype == torch.bfloat16 and S > 16384 and not DRY) else set()
    errs = {n: rel_err(a, b.grad) for n, a, b in zip(names, grads, xr) if n not in by_rows}
    bad = {n: f"{e:.2e}" for n, e in errs.items() if e > BWD_TOL[dtype]}
    for n, a, b in zip(names, grads, xr):
        if n in by_rows:
            assert torch.isfinite(a).all()
            d, ref = a.double() - b.grad, b.grad
            row = (d.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).flatten()
            med, p99 = row.quantile(row.new_tensor([0.5, 0.99])).tolist()
            if med > 1e-2 or p99 > 0.3:
                bad[n] = f"per-row median {med:.2e} (bound 1e-2), p99 {p99:.2e} (bound 0.3)"
    assert not bad, f"gradient errors above {BWD_TOL[dtype]}: {bad}"


@pytest.mark.skipif(DRY, reason="sync debug mode needs CUDA")
@pytest.mark.parametrize("loss_on", ["h", "h_and_state"])
@pytest.mark.parametrize("recompute", [False, True], ids=["kept_states", "recomputed_states"])
def test_backward_never_waits_for_the_device(loss_on, recompute):
    """A dense training backward launches everything without a host synchronisation (one would idle the GPU
    while the host launches the rest: 2.3 ms of each 7B layer's backward at 4428383). The forward of dense
    input syncs nothing either. Checked with CUDA's sync debug mode set to raise."""
    x = _inputs(4, 1000, torch.bfloat16, seed=11, requires_grad=True)
    s0 = [t.requires_grad_() for t in _state(4, seed=12)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h, st = mlstm_chunkwise_triton(*x, s0, recompute_states=recompute)
        loss = h.float().square().mean()
        if loss_on == "h_and_state":
            loss = loss + sum(t.float().mean() for t in st)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(t.grad).all() for t in (*x, *s0))


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16], ids=["fp32_pool", "bf16_pool"])
@pytest.mark.parametrize("B", [1, 8, 64, 256])
def test_step_slot_pool_7b(B, pool_dtype, rel_err, state_err):
    P = B + 3
    C, n, m = _state(P, seed=B)
    pool = [C.to(pool_dtype), n.to(pool_dtype), m.to(pool_dtype)]
    start = [t.clone() for t in pool]
    slots = torch.randperm(P, device=DEV)[:B].to(torch.int32)
    if B > 1:
        slots[::3] = -1
    x = [t[:, :, 0] for t in _inputs(B, 1, torch.bfloat16, seed=B + 1)]
    h = mlstm_step_slots_(*x, *pool, slots)
    live = (slots >= 0).nonzero().flatten()
    rows = slots[live].long()
    h_ref, st_ref = mlstm_step_torch(*(t[live].double() for t in x), [t[rows].double() for t in start])
    assert rel_err(h[live], h_ref) < STEP_TOL[torch.bfloat16]
    assert state_err([t[rows] for t in pool], st_ref) < STEP_TOL[pool_dtype]
    assert (h[(slots < 0).nonzero().flatten()] == 0).all()
    untouched = torch.ones(P, dtype=torch.bool, device=DEV)
    untouched[rows] = False
    assert all(torch.equal(a[untouched], b[untouched]) for a, b in zip(pool, start))


@pytest.mark.skipif(DRY, reason="CUDA graphs need CUDA")
def test_step_slot_pool_under_cuda_graph(rel_err):
    """The in-place step captures into a CUDA graph and replays correctly (counters reset each launch)."""
    B, P = 4, 6
    pool = [t.contiguous() for t in _state(P, seed=9)]
    ref = [t.clone() for t in pool]
    slots = torch.tensor([3, -1, 0, 5], dtype=torch.int32, device=DEV)
    x = [t[:, :, 0].contiguous() for t in _inputs(B, 1, torch.bfloat16, seed=10)]
    mlstm_step_slots_(*x, *[t.clone() for t in pool], slots)  # warm-up: compile, allocate counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        h = mlstm_step_slots_(*x, *pool, slots)
    rows = torch.tensor([3, 0, 5], device=DEV)
    live = torch.tensor([0, 2, 3], device=DEV)
    for _ in range(3):
        graph.replay()
        h_ref, st = mlstm_step_torch(*(t[live] for t in x), [t[rows] for t in ref])
        for t, s in zip(ref, st):
            t[rows] = s
        assert rel_err(h[live], h_ref) < 2e-2
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(pool, ref))
