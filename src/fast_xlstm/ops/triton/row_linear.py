"""Matrix-vector products of one-row decode steps, 16-bit: y [N] = W [N, K] @ x [K] (+ bias, + residual),
the SwiGLU of a fused up projection, and the q/k/v/o projection together with the fp32 gate projection.

At batch 1 a decode step streams the 7B's weights once (13.3 GB), so each projection is bound by how
many bytes its kernel keeps in flight. Each program here owns BN weight rows and walks K in BK-wide
tiles, multiply-adding on the CUDA cores into a [BN, BK] fp32 accumulator that is summed once at the
end. On an H100 the 7B's projections of one step, all 32 blocks and the head replayed as one CUDA
graph, took 4.57 ms (2.91 TB/s) against cuBLAS's 5.04 (2.64 TB/s), and 4.81 ms inside the decode
step (bench/results/h100-kernels-row-linear, h100-7b-row-linear). Slower there, and dropped: a
tensor-core form of the same tiles, a persistent form holding x in registers, other tilings,
programmatic dependent launches, and norms / SwiGLU recomputed inside each program.

What a step does right after a projection rides in that projection's kernel instead of a launch of its
own (a batch-1 step is a chain of ~400 small launches): the residual add after the down projection,
SiLU(gate) * up after the fused up projection (each program owns row r of both halves), and the
soft-capped fp32 input/forget gate rows beside the q/k/v/o rows (extra programs read the same x).
Results round where the eager modules round, so they match eager bf16 to its own rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, rtne


@triton.jit
def _row_dot(X, W, rows, rmask, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[BN] fp32 = W[rows] @ X over K (W contiguous rows of K; masked rows give 0)."""
    cols = tl.arange(0, BK)
    w_ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + cols) < K
        x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
        # each weight byte is read once per step: keep it from evicting what the next kernels reuse
        w = tl.load(w_ptrs + k0, mask=rmask[:, None] & kmask[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _row_linear_kernel(X, W, BIAS, RES, Y, N, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """Y [N] = W [N, K] (contiguous) @ X [K] + BIAS [N] (+ RES [N], added to the rounded product, as
    `residual + linear(x)` rounds); program p owns rows [p * BN, (p + 1) * BN)."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    y = _row_dot(X, W, rows, rmask, K, BN, BK)
    if HAS_BIAS:
        y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_RES:
        y = rtne(y, Y.dtype.element_ty).to(tl.float32) + tl.load(RES + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(Y + rows, rtne(y, Y.dtype.element_ty), mask=rmask)


@triton.jit
def _row_swiglu_kernel(X, W, Y, I, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Y [I] = SiLU(W[:I] @ X) * (W[I:] @ X) for W [2I, K] contiguous; program p owns rows
    [p * BN, (p + 1) * BN) of both halves, so the gate and up values of a row meet in registers.
    Rounded as F.silu(gate) * up on 16-bit tensors: gate, up, SiLU(gate) and the product each."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < I
    cols = tl.arange(0, BK)
    g_ptrs = W + rows[:, None].to(tl.int64) * K + cols[None, :]
    u_ptrs = W + (rows + I)[:, None].to(tl.int64) * K + cols[None, :]
    acc_g = tl.zeros([BN, BK], dtype=tl.float32)
    acc_u = tl.zeros([BN, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        kmask = (k0 + cols) < K
        wmask = rmask[:, None] & kmask[None, :]
        x = tl.load(X + k0 + cols, mask=kmask, other=0.0).to(tl.float32)
        wg = tl.load(g_ptrs + k0, mask=wmask, other=0.0, eviction_policy="evict_first")
        wu = tl.load(u_ptrs + k0, mask=wmask, other=0.0, eviction_policy="evict_first")
        acc_g += wg.to(tl.float32) * x[None, :]
        acc_u += wu.to(tl.float32) * x[None, :]
    dt = Y.dtype.element_ty
    g = rtne(tl.sum(acc_g, 1), dt).to(tl.float32)
    u = rtne(tl.sum(acc_u, 1), dt).to(tl.float32)
    s = rtne(g * tl.sigmoid(g), dt).to(tl.float32)
    tl.store(Y + rows, rtne(s * u, dt), mask=rmask)


@triton.jit
def _row_linear_gates_kernel(X, W, BIAS, Y, N, WG, BG, YG, NG, cap, K: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """Y [N] = W [N, K] @ X + BIAS (16-bit, as `_row_linear_kernel`), and in the programs after the
    first cdiv(N, BN): YG [NG] = cap * tanh((WG [NG, K] @ X + BG) / cap), with WG, BG and YG fp32 and
    x upcast exactly (the gate projection's fp32 product of the 16-bit normed input)."""
    pid = tl.program_id(0)
    n_main = tl.cdiv(N, BN)
    if pid < n_main:
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        y = _row_dot(X, W, rows, rmask, K, BN, BK)
        if HAS_BIAS:
            y += tl.load(BIAS + rows, mask=rmask, other=0.0).to(tl.float32)
        tl.store(Y + rows, rtne(y, Y.dtype.element_ty), mask=rmask)
    else:
        rows = (pid - n_main) * BN + tl.arange(0, BN)
        rmask = rows < NG
        z = _row_dot(X, WG, rows, rmask, K, BN, BK) + tl.load(BG + rows, mask=rmask, other=0.0)
        if HAS_CAP:
            # cap * tanh(z / cap) through exp (tanh(t) = 1 - 2 / (exp(2t) + 1): +-1 at the far ends)
            z = cap * (1.0 - 2.0 / (tl.exp(2.0 * z / cap) + 1.0))
        tl.store(YG + rows, z, mask=rmask)


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


def _launch(kernel, grid: int):
    return (kernel if INTERPRET else wrap_triton(kernel))[(grid,)]


def _check_row(name: str, x: Tensor, weight: Tensor, dtype: torch.dtype | None = None) -> int:
    """K of one row x [..., K] against weight [N, K] (of x's dtype unless `dtype` is given)."""
    K = x.shape[-1]
    if x.numel() != K:
        raise ValueError(f"{name} takes one row, got x of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != (dtype or x.dtype):
        raise ValueError(f"{name}: weight {tuple(weight.shape)} {weight.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype}")
    return K


def _check_vector(name: str, what: str, t: Tensor | None, n: int, dtype: torch.dtype) -> None:
    if t is not None and (t.numel() != n or t.dtype != dtype):
        raise ValueError(f"{name}: {what} {tuple(t.shape)} {t.dtype} does not fit {n} outputs of {dtype}")


@triton_op("fast_xlstm::row_linear", mutates_args=())
def row_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                      residual: Tensor | None = None) -> Tensor:
    """x [..., K] holding one row (bf16/fp16) -> [..., N] = weight [N, K] @ x + bias (+ residual [..., N],
    any shape of N elements), in x's dtype.

    The products accumulate in fp32 and round once (then once more after the residual add, as
    `residual + linear(x)` does). No autograd (inference only). A `triton_op`: inside torch.compile
    the kernel launches from inductor's generated code."""
    K = _check_row("row_linear", x, weight)
    N = weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"row_linear: bias {tuple(bias.shape)} does not fit {N} outputs")
    _check_vector("row_linear", "residual", residual, N, x.dtype)
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    bn, bk, warps = row_linear_tiling(N, K)
    _launch(_row_linear_kernel, triton.cdiv(N, bn))(
        x.reshape(K).contiguous(), weight.contiguous(), weight if bias is None else bias.contiguous(),
        weight if residual is None else residual.reshape(N).contiguous(), y, N, K=K, BN=bn, BK=bk,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, num_warps=warps)
    return y


@triton_op("fast_xlstm::row_swiglu", mutates_args=())
def row_swiglu_triton(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] one 16-bit row, weight [2I, K] (the gate rows, then the up rows) ->
    [..., I] = SiLU(weight[:I] @ x) * (weight[I:] @ x), in x's dtype (rounded as the eager modules
    round). No autograd; a `triton_op` like `row_linear_triton`."""
    K = _check_row("row_swiglu", x, weight)
    if weight.shape[0] % 2:
        raise ValueError(f"row_swiglu: weight {tuple(weight.shape)} must hold gate and up rows, an even count")
    inner = weight.shape[0] // 2
    y = torch.empty(*x.shape[:-1], inner, device=x.device, dtype=x.dtype)
    bn, bk, warps = row_linear_tiling(inner, K)
    _launch(_row_swiglu_kernel, triton.cdiv(inner, bn))(
        x.reshape(K).contiguous(), weight.contiguous(), y, inner, K=K, BN=bn, BK=bk, num_warps=warps)
    return y


@triton_op("fast_xlstm::row_linear_gates", mutates_args=())
def row_linear_gates_triton(x: Tensor, weight: Tensor, bias: Tensor | None, gate_weight: Tensor,
                            gate_bias: Tensor, cap: float | None) -> tuple[Tensor, Tensor]:
    """One launch for a layer's two input projections of a one-row step: x [..., K] (16-bit) ->
    y [..., N] = weight [N, K] @ x + bias in x's dtype, and gates [..., G] (fp32) =
    soft_cap(gate_weight [G, K] @ x.float() + gate_bias, cap), with gate_weight and gate_bias fp32
    (cap None: no soft cap). No autograd; a `triton_op` like `row_linear_triton`."""
    K = _check_row("row_linear_gates", x, weight)
    _check_row("row_linear_gates", x, gate_weight, dtype=torch.float32)
    N, G = weight.shape[0], gate_weight.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"row_linear_gates: bias {tuple(bias.shape)} does not fit {N} outputs")
    _check_vector("row_linear_gates", "gate bias", gate_bias, G, torch.float32)
    if cap is not None and not cap > 0:
        raise ValueError(f"row_linear_gates: the soft cap must be positive or None, got {cap}")
    y = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    gates = torch.empty(*x.shape[:-1], G, device=x.device, dtype=torch.float32)
    bn, bk, warps = row_linear_tiling(N, K)
    _launch(_row_linear_gates_kernel, triton.cdiv(N, bn) + triton.cdiv(G, bn))(
        x.reshape(K).contiguous(), weight.contiguous(), weight if bias is None else bias.contiguous(), y, N,
        gate_weight.contiguous(), gate_bias.contiguous(), gates, G, 1.0 if cap is None else float(cap),
        K=K, BN=bn, BK=bk, HAS_BIAS=bias is not None, HAS_CAP=cap is not None, num_warps=warps)
    return y, gates
