"""The matrix product of small-batch decode steps and short prefills: Y [M, N] = X [M, K] @ W [N, K]^T
(+ bias, + a residual), 16-bit, for 2 <= M <= 64 rows; and the fused up projection of the feed-forward,
SiLU(X @ W_gate^T) * (X @ W_up^T), in the same kernel. The two epilogues remove the elementwise
kernels (and their launch gaps) that would follow the product: two of a layer's twelve-odd kernels in
a decode step or a short prefill.

A decode step of a few sequences reads the 7B's weights once for all of them, so like the one-row
step it is bound by how fast the weights stream; with cuBLAS the H100 bench's decode steps at batch
2-16 moved 2.31-2.38 TB/s, weights and state counted (the baseline of bench/results/h100-7b-few-rows).
Here each program owns BN weight rows and walks K in BK-wide tiles, the rows of X padded to 16 (up to
16 rows) or 64 on the tensor cores (one [BM, BK] x [BK, BN] product per tile, fp32 sums rounded once),
with the weight tiles' loads pipelined over `num_stages` and marked evict-first (each weight byte is
read once per step). On an H100 a step's projections and head, replayed as one CUDA graph, took
4.87-4.95 ms at 2-16 rows against cuBLAS's 5.07-5.28, and decode at batch 2-16 ran 4-6% faster; at 32
and 64 rows 5.00-5.16 ms against 5.29-5.35 with each shape's best tiling (the op's rule picks, per shape,
one within 1% of it), decode +1.9% / +0.6% at batch 32 / 64 and a 64-token graph prefill 7.78 -> 7.60 ms
(bench/results/h100-7b-few-rows/first-f9c20aa, rows-32-64-d20ef91).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, dot_dtypes, dotcast, rtne

MAX_ROWS = 64
"""The most rows this kernel takes (more go to cuBLAS, whose GEMMs stream the weights well enough there)."""


def few_rows_block(m: int) -> int:
    """The tile height for m rows: the tensor cores' smallest (16) up to 16 rows, else 64. One height
    for 17-64 rows keeps torch.compile at one more variant of a dynamic-shape graph, not two."""
    return 16 if m <= 16 else 64


@triton.jit
def _few_rows_linear_kernel(X, W, BIAS, RES, Y, M, N, sxm, srm, K: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                            SWIGLU: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr):
    """Y [M, N] (contiguous) = X [M, K] (row stride sxm) @ W [N, K]^T (contiguous) + BIAS [N]
    (+ RES [M, N], row stride srm); program p owns output columns [p * BN, (p + 1) * BN); rows of X
    past M are masked to zero.

    SWIGLU: W is [2N, K] (gate rows, then up rows) and Y = SiLU(X @ W[:N]^T) * (X @ W[N:]^T); the
    program reads the gate and up rows of its columns, so both products meet in registers. Rounded
    as the eager ops round 16-bit tensors: the product (gate, up), the residual sum, SiLU(gate) and
    SiLU(gate) * up each once."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    cmask = cols < N
    rows = tl.arange(0, BM)
    rmask = rows < M
    ks = tl.arange(0, BK)
    w_ptrs = W + cols[:, None].to(tl.int64) * K + ks[None, :]
    u_ptrs = W + (cols + N)[:, None].to(tl.int64) * K + ks[None, :]
    x_ptrs = X + rows[:, None].to(tl.int64) * sxm + ks[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_u = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + ks) < K
        x = dotcast(tl.load(x_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0), IN_DT, DOT_DT)
        wmask = cmask[:, None] & kmask[None, :]
        w = tl.load(w_ptrs + k0, mask=wmask, other=0.0, eviction_policy="evict_first")
        acc += tl.dot(x, tl.trans(dotcast(w, IN_DT, DOT_DT)))
        if SWIGLU:
            wu = tl.load(u_ptrs + k0, mask=wmask, other=0.0, eviction_policy="evict_first")
            acc_u += tl.dot(x, tl.trans(dotcast(wu, IN_DT, DOT_DT)))
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    dt = Y.dtype.element_ty
    omask = rmask[:, None] & cmask[None, :]
    if SWIGLU:
        g = rtne(acc, dt).to(tl.float32)
        acc = rtne(g * tl.sigmoid(g), dt).to(tl.float32) * rtne(acc_u, dt).to(tl.float32)
    if HAS_RES:
        res = tl.load(RES + rows[:, None].to(tl.int64) * srm + cols[None, :], mask=omask, other=0.0)
        acc = rtne(acc, dt).to(tl.float32) + res.to(tl.float32)
    tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], rtne(acc, dt), mask=omask)


def few_rows_tiling(N: int, K: int, bm: int = 16) -> tuple[int, int, int, int]:
    """(BN output columns per program, BK input features per tile, warps, stages) for a [N, K] weight
    and tile height bm."""
    if INTERPRET:
        return 64, min(256, triton.next_power_of_2(K)), 4, 1
    if bm == 16 or N <= 4096:
        return 32, min(256, triton.next_power_of_2(K)), 4, 4
    # 64-row tiles of a wide weight (the fused q|k|v|o, gate|up and the head): 128-wide steps, 3 stages
    # (bench/results/h100-7b-few-rows/rows-32-64-d20ef91: 4 stages of 256 were 3-10% slower there)
    return 32, min(128, triton.next_power_of_2(K)), 4, 3


def _check_x(name: str, x: Tensor, weight: Tensor) -> int:
    """Validates 16-bit x [..., K] holding at most `MAX_ROWS` rows against weight [*, K]; returns K."""
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype or x.dtype not in (
            torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} {weight.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype} (16-bit, one dtype)")
    if x.numel() // max(K, 1) > MAX_ROWS:
        raise ValueError(f"{name} takes at most {MAX_ROWS} rows, got x of shape {tuple(x.shape)}")
    return K


def _launch(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, n: int,
            swiglu: bool) -> Tensor:
    """Runs the kernel for n output columns of x [..., K] -> [..., n] (checked by the callers)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    res = None
    if residual is not None:
        res = residual.reshape(M, n)
        res = res if res.stride(-1) == 1 else res.contiguous()
    y = torch.empty(M, n, device=x.device, dtype=x.dtype)
    bm = few_rows_block(M)
    # (the SwiGLU form reads BN gate and BN up rows per program; half-width tiles for it at 64 rows
    # measured the same, bench/results/h100-7b-few-rows/epilogues-612f6fd, so it keeps the plain tiling)
    bn, bk, warps, stages = few_rows_tiling(n, K, bm)
    in_dt, dot_dt, _ = dot_dtypes(x.dtype)
    kernel = _few_rows_linear_kernel if INTERPRET else wrap_triton(_few_rows_linear_kernel)
    w = weight.contiguous()
    kernel[(triton.cdiv(n, bn),)](x2, w, w if bias is None else bias.contiguous(), w if res is None else res, y, M,
                                  n, x2.stride(0), 0 if res is None else res.stride(0), K=K, BM=bm, BN=bn, BK=bk,
                                  HAS_BIAS=bias is not None, HAS_RES=res is not None, SWIGLU=swiglu,
                                  IN_DT=in_dt, DOT_DT=dot_dt, num_warps=warps, num_stages=stages)
    return y.reshape(*x.shape[:-1], n)


@triton_op("fast_xlstm::few_rows_linear", mutates_args=())
def few_rows_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                           residual: Tensor | None = None) -> Tensor:
    """x [..., K] holding 1 to `MAX_ROWS` rows (bf16/fp16) -> [..., N] = x @ weight [N, K]^T + bias
    (+ residual, shaped like the output), in x's dtype; fp32 sums on the tensor cores, rounded once
    (then once more after the residual add, as `residual + linear(x)` rounds). No autograd (inference
    only). A `triton_op`: inside torch.compile the kernel launches from inductor's generated code,
    with the row count a run-time value (one compiled kernel for every small batch)."""
    _check_x("few_rows_linear", x, weight)
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"few_rows_linear: bias {tuple(bias.shape)} does not fit {N} outputs")
    if residual is not None and (residual.shape != (*x.shape[:-1], N) or residual.dtype != x.dtype):
        raise ValueError(f"few_rows_linear: residual {tuple(residual.shape)} {residual.dtype} does not fit the "
                         f"output {(*x.shape[:-1], N)} {x.dtype}")
    return _launch(x, weight, bias, residual, N, swiglu=False)


@triton_op("fast_xlstm::few_rows_swiglu", mutates_args=())
def few_rows_swiglu_triton(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] holding 1 to `MAX_ROWS` 16-bit rows, weight [2I, K] (the gate rows, then the up rows)
    -> [..., I] = SiLU(x @ weight[:I]^T) * (x @ weight[I:]^T) in one kernel, rounded as the eager
    ops round (`F.silu(gate) * up`). No autograd; a `triton_op` like `few_rows_linear_triton`."""
    _check_x("few_rows_swiglu", x, weight)
    if weight.shape[0] % 2:
        raise ValueError(f"few_rows_swiglu: weight {tuple(weight.shape)} must hold gate and up rows, an even count")
    return _launch(x, weight, None, None, weight.shape[0] // 2, swiglu=True)
