"""The matrix-vector product of one-row decode steps: y [N] = W [N, K] @ x [K] (+ bias), 16-bit.

At batch 1 a decode step streams the 7B's weights once (13.3 GB), so each projection is bound by how
many bytes its kernel keeps in flight. Each program here owns BN weight rows and walks K in BK-wide
tiles, multiply-adding on the CUDA cores into a [BN, BK] fp32 accumulator that is summed once at the
end. On an H100 the 7B's projections of one step, all 32 blocks and the head replayed as one CUDA
graph, took 4.57 ms (2.91 TB/s) against cuBLAS's 5.04 (2.64 TB/s), and 4.81 ms inside the decode
step (bench/results/h100-kernels-row-linear, h100-7b-row-linear). Slower there, and dropped: a
tensor-core form of the same tiles, a persistent form holding x in registers, other tilings,
programmatic dependent launches, and norms / SwiGLU recomputed inside each program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, rtne


@triton.jit
def _row_linear_kernel(X, W, BIAS, Y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    """Y [N] = W [N, K] (contiguous) @ X [K] + BIAS [N]; program p owns rows [p * BN, (p + 1) * BN)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    cols = tl.arange(0, BK)
    w_ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + cols) < K
        x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
        # each weight byte is read once per step: keep it from evicting what the next kernels reuse
        w = tl.load(w_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + rows, rtne(y, Y.dtype.element_ty), mask=rmask)


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
def row_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] holding one row (bf16/fp16) -> [..., N] = weight [N, K] @ x + bias, in x's dtype.

    The products accumulate in fp32 and round once. No autograd (inference only). A `triton_op`:
    inside torch.compile the kernel launches from inductor's generated code."""
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"row_linear takes one row, got x of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype:
        raise ValueError(f"row_linear: weight {tuple(weight.shape)} {weight.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype}")
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"row_linear: bias {tuple(bias.shape)} does not fit {N} outputs")
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    bn, bk, warps = row_linear_tiling(N, K)
    kernel = _row_linear_kernel if INTERPRET else wrap_triton(_row_linear_kernel)
    kernel[(triton.cdiv(N, bn),)](x.reshape(K).contiguous(), weight.contiguous(),
                                  weight if bias is None else bias.contiguous(), y, N, K=K, BN=bn, BK=bk,
                                  HAS_BIAS=bias is not None, num_warps=warps)
    return y
