"""Matrix-vector products for one-row decode steps: y [N] = W [N, K] @ x [K], bf16 in and out.

At batch 1 a decode step is the 7B's weights streamed once (13.3 GB), so each projection is bound
by how many bytes the kernel keeps in flight. Two forms, timed against each other by
`bench/gemv_sweep.py`:

  "fma"  each program owns BN weight rows and walks K in BK-wide tiles, multiply-adding on the CUDA
         cores into a [BN, BK] fp32 accumulator that is summed once at the end;
  "dot"  the same tiles go through the tensor cores as W_tile [BN, BK] @ X [BK, 16] with x in
         column 0 (the other 15 columns zero): the loop's loads are then pipelined by Triton's
         software pipeliner (STAGES tiles in flight per program), which plain loads are not.

Both accumulate in fp32 and round once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET


@triton.jit
def _row_linear_fma_kernel(X, W, Y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           STAGES: tl.constexpr):
    """Y [N] = W [N, K] (contiguous) @ X [K]; program p owns rows [p * BN, (p + 1) * BN)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    cols = tl.arange(0, BK)
    w_ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        kmask = (k0 + cols) < K
        x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    tl.store(Y + rows, tl.sum(acc, 1).to(Y.dtype.element_ty), mask=rmask)


@triton.jit
def _row_linear_dot_kernel(X, W, Y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           STAGES: tl.constexpr, FP32_DOT: tl.constexpr):
    """As the fma kernel, through tl.dot with x as column 0 of a [BK, 16] operand.

    FP32_DOT: operands enter the dot as fp32 (the CPU interpreter multiplies 16-bit operands wrongly)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    ks = tl.arange(0, BK)
    cs = tl.arange(0, 16)
    w_ptrs = W + rows[:, None].to(tl.int64) * K + ks[None, :]
    acc = tl.zeros([BN, 16], dtype=tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=STAGES):
        kmask = (k0 + ks) < K
        w = tl.load(w_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0)
        # x broadcast into column 0 only: columns 1..15 load nothing (masked) and stay zero
        x = tl.load(X + k0 + ks[:, None] + cs[None, :] * 0, mask=kmask[:, None] & (cs[None, :] == 0), other=0.0)
        if FP32_DOT:
            acc = tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
    y = tl.sum(tl.where(cs[None, :] == 0, acc, 0.0), 1)
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)


def row_linear(x: Tensor, weight: Tensor, *, kind: str = "fma", bn: int = 8, bk: int = 512, warps: int = 4,
               stages: int = 1, out: Tensor | None = None) -> Tensor:
    """y [N] = weight [N, K] @ x [K] (x may be [1, K]; y then [1, N]) with one launch of `kind`."""
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"row_linear takes one row, got x of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or not weight.is_contiguous():
        raise ValueError(f"row_linear: weight {tuple(weight.shape)} must be contiguous [N, {K}]")
    N = weight.shape[0]
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype) if out is None else out
    xc = x.reshape(K).contiguous()
    grid = (triton.cdiv(N, bn),)
    if kind == "fma":
        _row_linear_fma_kernel[grid](xc, weight, y, N, K=K, BN=bn, BK=bk, STAGES=stages, num_warps=warps)
    elif kind == "dot":
        _row_linear_dot_kernel[grid](xc, weight, y, N, K=K, BN=bn, BK=bk, STAGES=stages, FP32_DOT=INTERPRET,
                                     num_warps=warps)
    else:
        raise ValueError(f"row_linear kind is 'fma' or 'dot', got {kind!r}")
    return y
