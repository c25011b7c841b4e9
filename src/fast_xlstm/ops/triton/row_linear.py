"""The matrix-vector product of one-row decode steps: y [N] = W [N, K] @ x [K] (+ bias), 16-bit.

At batch 1 a decode step streams the 7B's weights once (13.3 GB), so each projection is bound by how
many bytes its kernel keeps in flight. Each program here owns BN weight rows and walks K in BK-wide
tiles, multiply-adding on the CUDA cores into a [BN, BK] fp32 accumulator that is summed once at the
end. On an H100 the 7B's projections of one step, all 32 blocks and the head replayed as one CUDA
graph, took 4.55 ms (2.93 TB/s) against cuBLAS's 5.05 (2.64 TB/s); a tensor-core form of the same
tiles (x as column 0 of a [BK, 16] operand, loads pipelined) was slower on every shape
(bench/results/h100-kernels-row-linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, rtne


@triton.jit
def _row_linear_kernel(X, W, BIAS, NW, R, Y, N, eps, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, RESIDUAL: tl.constexpr):
    """Y [N] = R [N] + W [N, K] (contiguous) @ act(X) + BIAS [N]; program p owns rows [p * BN, (p + 1) * BN).

    act(X), rounded to Y's dtype where torch rounds it: with NORM, X [K] through RMSNorm with weight
    NW [K] (fp32 statistics, rounded, then times the weight, rounded); with SWIGLU, X [2K] = gate | up
    and act = silu(gate) * up (silu rounded, the product rounded); else X [K] itself. With RESIDUAL the
    product is rounded before R is added, as `r + linear(..)` rounds it."""
    DT = Y.dtype.element_ty
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    cols = tl.arange(0, BK)
    if NORM:  # every program reduces X itself: 2K bytes from L2 against BN * 2K bytes of weights
        ss = tl.zeros([BK], dtype=tl.float32)
        for k0 in range(0, K, BK):
            xv = tl.load(X + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = tl.rsqrt(tl.sum(ss, 0) / K + eps)
    w_ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + cols) < K
        if SWIGLU:
            g = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
            u = tl.load(X + K + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
            x = rtne(rtne(g * tl.sigmoid(g), DT).to(tl.float32) * u, DT).to(tl.float32)
        else:
            x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
            if NORM:
                nw = tl.load(NW + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
                x = rtne(rtne(x * rstd, DT).to(tl.float32) * nw, DT).to(tl.float32)
        # each weight byte is read once per step: keep it from evicting what the next kernels reuse
        w = tl.load(w_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
    if RESIDUAL:
        y = rtne(y, DT).to(tl.float32) + tl.load(R + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + rows, rtne(y, DT), mask=rmask)


def row_linear_tiling(N: int, K: int) -> tuple[int, int, int]:
    """(BN rows per program, BK input features per tile, warps) for a [N, K] weight.

    From the H100 sweeps (`bench/gemv_sweep.py`, bench/results/h100-kernels-row-linear): one row per
    program in 2,048-wide tiles with 16 warps was the fastest tiling of four of the 7B's five shapes
    and within 2% on the fifth. The interpreter (CPU tests) runs programs one after another, so there
    each program takes many rows."""
    bk = min(2048, triton.next_power_of_2(K))
    if INTERPRET:
        return 64, bk, 4
    return 1, bk, 16


@triton_op("fast_xlstm::row_linear", mutates_args=())
def row_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, norm_weight: Tensor | None = None,
                      eps: float = 0.0, residual: Tensor | None = None, swiglu: bool = False) -> Tensor:
    """x [..., K] holding one row (bf16/fp16) -> [..., N] = residual + weight [N, K] @ act(x) + bias, in
    x's dtype, where act is RMSNorm with `norm_weight` [K] and `eps` when given, silu(gate) * up when
    `swiglu` (x [..., 2K] = gate | up), else the identity; `residual` has the output's shape.

    The products accumulate in fp32 and round once; the activations and the residual add round as
    their torch forms do. No autograd (inference only). A `triton_op`: inside torch.compile the
    kernel launches from inductor's generated code."""
    K = weight.shape[-1]
    width = 2 * K if swiglu else K
    if x.numel() != x.shape[-1]:
        raise ValueError(f"row_linear takes one row, got x of shape {tuple(x.shape)}")
    if weight.dim() != 2 or x.shape[-1] != width or weight.dtype != x.dtype:
        raise ValueError(f"row_linear: weight {tuple(weight.shape)} {weight.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype}" + (" (gate | up halves)" if swiglu else ""))
    if swiglu and norm_weight is not None:
        raise ValueError("row_linear: one input activation at a time (norm or swiglu)")
    N = weight.shape[0]
    out_shape = (*x.shape[:-1], N)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"row_linear: bias {tuple(bias.shape)} does not fit {N} outputs")
    if norm_weight is not None and (norm_weight.shape != (K,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"row_linear: norm weight {tuple(norm_weight.shape)} {norm_weight.dtype} does not fit "
                         f"{K} input features of {x.dtype}")
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype):
        raise ValueError(f"row_linear: residual {tuple(residual.shape)} {residual.dtype} is not the output's "
                         f"{out_shape} {x.dtype}")
    y = torch.empty(out_shape, device=x.device, dtype=x.dtype)
    bn, bk, warps = row_linear_tiling(N, K)
    kernel = _row_linear_kernel if INTERPRET else wrap_triton(_row_linear_kernel)
    wc = weight.contiguous()
    kernel[(triton.cdiv(N, bn),)](x.reshape(width).contiguous(), wc, wc if bias is None else bias.contiguous(),
                                  wc if norm_weight is None else norm_weight.contiguous(),
                                  wc if residual is None else residual.reshape(N).contiguous(), y, N, eps, K=K,
                                  BN=bn, BK=bk, HAS_BIAS=bias is not None, NORM=norm_weight is not None,
                                  SWIGLU=swiglu, RESIDUAL=residual is not None, num_warps=warps)
    return y
