"""The fp32 gate projection of a long prefill as one memory-bound kernel.

The i/f gate projections (2 * NH output rows, 16 for the 7B) run in fp32 on the bf16 normed input, as
in training. As a GEMM that is an fp32 copy of the whole input (4 bytes per element written and read
again), a SIMT GEMM whose 128-wide tiles are mostly empty, and a split-K reduction. This kernel reads the
bf16 input once and runs on the tensor cores without losing the fp32 weights: each fp32 weight is split
exactly into three bf16 parts (w = hi + mid + lo, 8 significand bits each), and x @ w is the sum of three
bf16 products accumulated in fp32. A bf16 x times a bf16 part is exact in fp32, so the result is the fp32
product up to summation order, as the fp32 GEMM gives it. (fp32 dot products on CUDA cores, the plain
way to write this, ran at a tenth of the memory bandwidth on an H100.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, rtne


# M (the row count) changes with every prefill: not specialized, so one compiled variant serves all.
@triton.jit(do_not_specialize=["M"])
def _gate_projection_kernel(X, W, BIAS, P, M, K, KS, sxm, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                            BK: tl.constexpr, FP32_DOT: tl.constexpr):
    """P[s] [M, N] fp32 = X [M, ks] (bf16, row stride sxm) @ W [N, ks].T (fp32, contiguous) over the
    input-feature slice ks = [s * KS, (s + 1) * KS) of split s = program_id(1), plus BIAS [N] in split 0.

    FP32_DOT: the bf16 values enter the products as fp32 (exact "ieee" products): for the CPU
    interpreter, which multiplies 16-bit operands wrongly."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    mr = rows < M
    cols = tl.arange(0, NP)
    mc = cols < N
    x_ptr = X + rows[:, None].to(tl.int64) * sxm
    acc = tl.zeros([BM, NP], dtype=tl.float32)
    k_end = tl.minimum(K, (split + 1) * KS)
    for k0 in range(split * KS, k_end, BK):
        ks = k0 + tl.arange(0, BK)
        mk = ks < k_end
        x = tl.load(x_ptr + ks[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        w = tl.load(W + cols[None, :] * K + ks[:, None], mask=mk[:, None] & mc[None, :], other=0.0)
        w_hi = rtne(w, tl.bfloat16).to(tl.float32)
        rest = w - w_hi  # exact in fp32, as is the next remainder
        w_mid = rtne(rest, tl.bfloat16).to(tl.float32)
        w_lo = rtne(rest - w_mid, tl.bfloat16).to(tl.float32)
        if FP32_DOT:
            xf = x.to(tl.float32)
            acc = tl.dot(xf, w_lo, acc, input_precision="ieee")  # smallest parts first
            acc = tl.dot(xf, w_mid, acc, input_precision="ieee")
            acc = tl.dot(xf, w_hi, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_lo.to(tl.bfloat16), acc)
            acc = tl.dot(x, w_mid.to(tl.bfloat16), acc)
            acc = tl.dot(x, w_hi.to(tl.bfloat16), acc)
    acc += tl.load(BIAS + cols, mask=mc & (split == 0), other=0.0)[None, :]
    tl.store(P + split.to(tl.int64) * M * N + rows[:, None] * N + cols[None, :], acc, mask=mr[:, None] & mc[None, :])


# Rows per program and input-feature splits. One choice for every row count: a choice by row count
# would be a shape guard, and so a recompile, inside the compiled regions that call this op. The K loop
# is latency-bound (a 2,048-token prefill's rows alone give 32 programs of 64 rows), so the input
# features are split across programs too, and the split partial sums (SPLIT * M * N fp32, 3% of x's
# bytes at the 7B's 16 outputs) are added by the caller's fused code: deterministic, unlike atomics.
# On an H100 (7B, per forward, bench/results/h100-profile/gate-split-788cec1): 64 rows x 4 splits 0.35 ms
# at 2,048 tokens and 7.2 ms at 65,536, against 1.76 / 15.1 ms for one split of 32 rows (and 1.45-1.64 /
# 6.5 ms for the 16 / 64 rows that an earlier choice by row count took). Alone at 65,536 rows, 1 split
# is ~7% faster than 4 (the partial sums' bytes), which the 2k prefill's 5x more than pays for.
_ROWS_PER_PROGRAM = 64
_K_SPLITS = 4


@triton_op("fast_xlstm::gate_projection", mutates_args=())
def gate_projection_triton(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [..., K] bf16 -> fp32 [..., N] = x.float() @ weight.float().T + bias.float().

    weight [N, K] and bias [N] are used in fp32 (the loader keeps the gate weights fp32). No autograd:
    the model calls this for inference only. A `triton_op`: inside torch.compile the kernel launches
    from inductor's generated code, not through Triton's Python launcher (~0.15 ms of host time a call).
    """
    K = x.shape[-1]
    N = weight.shape[0]
    if x.dtype != torch.bfloat16:
        raise ValueError(f"the gate projection kernel takes bf16 input (exact in its bf16 products), got {x.dtype}")
    if weight.shape[1] != K or bias.shape != (N,):
        raise ValueError(f"gate projection: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not "
                         f"fit input features {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    bk = 128
    splits = _K_SPLITS
    parts = torch.empty(splits, M, N, device=x.device, dtype=torch.float32)
    if M:
        bm = _ROWS_PER_PROGRAM
        ks = triton.cdiv(triton.cdiv(K, splits), bk) * bk  # whole BK blocks per split
        kernel = _gate_projection_kernel if INTERPRET else wrap_triton(_gate_projection_kernel)
        kernel[(triton.cdiv(M, bm), splits)](x2, weight.float().contiguous(), bias.float().contiguous(), parts, M, K,
                                             ks, x2.stride(0), N=N, NP=max(16, triton.next_power_of_2(N)), BM=bm,
                                             BK=bk, FP32_DOT=INTERPRET, num_warps=4)
    return parts.sum(0).reshape(*x.shape[:-1], N)
