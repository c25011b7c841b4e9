"""The fp32 gate projection of a long prefill as one memory-bound kernel.

The i/f gate projections (2 * NH output rows, 16 for the 7B) run in fp32 on the bf16 normed input, as
in training. As a GEMM that is an fp32 copy of the whole input (4 bytes per element written and read
again), a SIMT GEMM whose 128-wide tiles are mostly empty, and a split-K reduction. This kernel reads the
input once in its own dtype, upcasts in registers and accumulates in fp32 (exact fp32 products of the
upcast values, as the GEMM computes them; only the summation order differs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


# M (the row count) changes with every prefill: not specialized, so one compiled variant serves all.
@triton.jit(do_not_specialize=["M"])
def _gate_projection_kernel(X, W, BIAS, Y, M, K, sxm, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr,
                            BK: tl.constexpr):
    """Y [M, N] fp32 = X [M, K] (row stride sxm, any float dtype) @ W [N, K].T (fp32, contiguous) + BIAS [N]."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    mr = rows < M
    cols = tl.arange(0, NP)
    mc = cols < N
    x_ptr = X + rows[:, None].to(tl.int64) * sxm
    acc = tl.zeros([BM, NP], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        mk = ks < K
        x = tl.load(x_ptr + ks[None, :], mask=mr[:, None] & mk[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + cols[None, :] * K + ks[:, None], mask=mk[:, None] & mc[None, :], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    acc += tl.load(BIAS + cols, mask=mc, other=0.0)[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], acc, mask=mr[:, None] & mc[None, :])


# Rows per program: small prefills take short tiles so that enough programs stream the input.
_SHORT_TILE_BELOW = 16384


@torch.library.custom_op("fast_xlstm::gate_projection", mutates_args=())
def gate_projection_triton(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x [..., K] (bf16, fp16 or fp32) -> fp32 [..., N] = x.float() @ weight.float().T + bias.float().

    weight [N, K] and bias [N] are used in fp32 (the loader keeps the gate weights fp32). No autograd:
    the model calls this for inference only.
    """
    K = x.shape[-1]
    N = weight.shape[0]
    if weight.shape[1] != K or bias.shape != (N,):
        raise ValueError(f"gate projection: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not "
                         f"fit input features {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if M:
        w = weight.float().contiguous()
        b = bias.float().contiguous()
        bm = 16 if M < _SHORT_TILE_BELOW else 64
        _gate_projection_kernel[(triton.cdiv(M, bm),)](x2, w, b, y, M, K, x2.stride(0), N=N,
                                                     NP=max(16, triton.next_power_of_2(N)), BM=bm, BK=128,
                                                     num_warps=4)
    return y.reshape(*x.shape[:-1], N)


@gate_projection_triton.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32)
