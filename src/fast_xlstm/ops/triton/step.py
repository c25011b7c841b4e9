"""Fused mLSTM decode step: one launch per layer, functional or in place on a state-slot pool.

Grid: one program per (batch row, head, DV tile), so batch 1 still spreads over many SMs. Every program
recomputes the per-head scalars it needs (new m, and n.q, which needs all of DK: it loops over DK
tiles) and updates its own [DK, BV] slice of C. Decode is bandwidth-bound: each C element is read once
and written once, in the pool's dtype (fp32 or bf16); all gate and normalizer math is fp32.

In place, n and m are shared by the DV-tile programs of a (slot, head): each program reads the old
values, then takes a ticket from a per-(row, head) counter (atomic, acq_rel); the program that draws
the last ticket is the last reader, so it alone writes the new n and m and resets the counter to 0 for
the next launch. No second launch, no barrier, no extra state buffers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._checks import MLSTMState, check_state
from ._common import logsigmoid, pow2, rtne, tl_dtype


@triton.jit
def _step_kernel(Q, K, V, I, F, C_in, N_in, M_in, C_out, N_out, M_out, SLOTS, CNT, H, NH, n_vt, scale, eps,
                 sq, sk, sv, si, sf, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 HAS_SLOTS: tl.constexpr, HAS_STATE: tl.constexpr, INPLACE: tl.constexpr):
    """q, k [B, NH, DK]; v, h [B, NH, DV]; i, f [B, NH]; state rows [*, NH, DK, DV] / [*, NH, DK] / [*, NH].

    q, k, v, i, f may be row views of a wider tensor (a fused projection's output): sq .. sf are their
    batch strides; within a row they are contiguous. h and the state rows are contiguous.

    State row of batch row b: SLOTS[b] if HAS_SLOTS (negative = skip: state untouched, h = 0), else b.
    """
    pid = tl.program_id(0)
    vt = pid % n_vt
    bh = pid // n_vt
    h = bh % NH
    b = bh // NH
    if HAS_SLOTS:
        slot = tl.load(SLOTS + b)
    else:
        slot = b
    valid = slot >= 0
    sh = tl.maximum(slot, 0).to(tl.int64) * NH + h  # state (row, head)
    bh64 = bh.to(tl.int64)
    b64 = b.to(tl.int64)

    ig = tl.load(I + b64 * si + h).to(tl.float32)
    lf = logsigmoid(tl.load(F + b64 * sf + h).to(tl.float32))
    if HAS_STATE:
        m0 = tl.load(M_in + sh, mask=valid, other=0.0).to(tl.float32)
    else:
        m0 = tl.zeros([], dtype=tl.float32)
    m = tl.maximum(lf + m0, ig)
    fa = tl.exp(lf + m0 - m)
    ia = tl.exp(ig - m)

    dv = vt * BV + tl.arange(0, BV)
    mv = dv < DV
    vv = tl.load(V + b64 * sv + h * DV + dv, mask=mv, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    qn = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DK
        qq = tl.load(Q + b64 * sq + h * DK + dk, mask=mk, other=0.0).to(tl.float32)
        kk = tl.load(K + b64 * sk + h * DK + dk, mask=mk, other=0.0).to(tl.float32)
        tile = sh * (DK * DV) + dk[:, None] * DV + dv[None, :]
        mkv = mk[:, None] & mv[None, :]
        if HAS_STATE:
            c = tl.load(C_in + tile, mask=mkv & valid, other=0.0).to(tl.float32)
            n = tl.load(N_in + sh * DK + dk, mask=mk & valid, other=0.0).to(tl.float32)
        else:
            c = tl.zeros([BK, BV], dtype=tl.float32)
            n = tl.zeros([BK], dtype=tl.float32)
        c = fa * c + (ia * kk)[:, None] * vv[None, :]
        tl.store(C_out + tile, rtne(c, C_out.dtype.element_ty), mask=mkv & valid)
        num += tl.sum(qq[:, None] * c, 0)
        qn += qq * (fa * n + ia * kk)
        if not INPLACE:
            tl.store(N_out + sh * DK + dk, rtne(fa * n + ia * kk, N_out.dtype.element_ty), mask=mk & valid & (vt == 0))

    den = tl.maximum(tl.abs(tl.sum(qn, 0) * scale), tl.exp(-m)) + eps
    out = tl.where(valid, num * scale / den, 0.0)
    tl.store(H + bh64 * DV + dv, rtne(out, H.dtype.element_ty), mask=mv)

    if INPLACE:
        # Last reader of the old n, m writes the new ones (see the module docstring).
        ticket = tl.atomic_add(CNT + bh64, 1, mask=valid, sem="acq_rel")
        writer = valid & (ticket == n_vt - 1)
        for k0 in range(0, DK, BK):
            dk = k0 + tl.arange(0, BK)
            mk = dk < DK
            kk = tl.load(K + b64 * sk + h * DK + dk, mask=mk, other=0.0).to(tl.float32)
            n = tl.load(N_in + sh * DK + dk, mask=mk & writer, other=0.0).to(tl.float32)
            tl.store(N_out + sh * DK + dk, rtne(fa * n + ia * kk, N_out.dtype.element_ty), mask=mk & writer)
        tl.store(M_out + sh, rtne(m, M_out.dtype.element_ty), mask=writer)
        tl.atomic_xchg(CNT + bh64, 0, mask=writer, sem="acq_rel")
    else:
        tl.store(M_out + sh, rtne(m, M_out.dtype.element_ty), mask=valid & (vt == 0))


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 tickets, one per (batch row, head); kernels leave them zero again.

    Allocated once per device (grow-only); call once before CUDA-graph capture so capture allocates nothing.
    """
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _tiles(B: int, NH: int, DK: int, DV: int) -> tuple[int, int, int]:
    """(BK, BV, num_warps): narrow DV tiles when the batch is small, so >= ~2 programs per SM.

    A small batch is latency-bound: each program then loads its whole [DK, BV] slice of C at once
    instead of walking DK in serial tiles. At the 7B head shape on an H100 (state in L2, so the
    latency part), batch 1 / 2 / 4 took 5.0 / 6.8 / 9.3 us a launch with DK-wide tiles against
    7.0 / 8.1 / 10.2 with 64-row ones; at batch 8 and 16 the 64x64 tiles stay best
    (bench/results/h100-kernels-step-1de3430)."""
    small = B * NH * DV <= 64 * 264
    bv = min(32 if small else 64, pow2(DV))
    bk = min(256 if small else 64, pow2(DK))
    return bk, bv, 4 if bk * bv >= 4096 else 2


def _check_step_inputs(q, k, v, i, f) -> tuple[int, int, int, int]:
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"step expects q, k [B, NH, DK] and v [B, NH, DV], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, NH, DK = q.shape
    if f is None:
        if i.shape != (B, 2 * NH):
            raise ValueError(f"step expects packed gates (i | f) of shape [{B}, {2 * NH}], got {tuple(i.shape)}")
    elif i.shape != (B, NH) or f.shape != (B, NH):
        raise ValueError(f"step expects gates i, f of shape [{B}, {NH}], got {tuple(i.shape)}, {tuple(f.shape)}")
    tl_dtype(q.dtype)
    return B, NH, DK, v.shape[-1]


def _rows_contiguous(x: Tensor) -> Tensor:
    """x [B, ...] itself if each row is contiguous (any batch stride), else a contiguous copy."""
    inner = x[0] if x.shape[0] > 0 else x
    if x.shape[0] > 0 and inner.is_contiguous() and x.stride(0) >= inner.numel():
        return x
    return x.contiguous()


def _launch(q, k, v, i, f, Ci, Ni, Mi, Co, No, Mo, slots, cnt, h, has_state, inplace, eps):
    B, NH, DK = q.shape
    DV = v.shape[-1]
    bk, bv, nw = _tiles(B, NH, DK, DV)
    n_vt = triton.cdiv(DV, bv)
    # Row views of a fused projection's output are read in place (a copy each would be 5 more
    # launches per layer per decode step); anything else is made contiguous first.
    q, k, v, i, f = (_rows_contiguous(x) for x in (q, k, v, i, f))
    _step_kernel[(B * NH * n_vt,)](q, k, v, i, f, Ci, Ni, Mi, Co, No, Mo, slots, cnt, h, NH, n_vt, DK ** -0.5, eps,
                                   q.stride(0), k.stride(0), v.stride(0), i.stride(0), f.stride(0),
                                   DK=DK, DV=DV, BK=bk, BV=bv, HAS_SLOTS=slots is not None, HAS_STATE=has_state,
                                   INPLACE=inplace, num_warps=nw)


@torch.library.custom_op("fast_xlstm::mlstm_step", mutates_args=())
def _step_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C: Optional[Tensor], n: Optional[Tensor],
             m: Optional[Tensor], eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, NH, DK = q.shape
    DV = v.shape[-1]
    has_state = C is not None
    sd = C.dtype if has_state else torch.float32
    Co = torch.empty(B, NH, DK, DV, dtype=sd, device=q.device)
    No = torch.empty(B, NH, DK, dtype=sd, device=q.device)
    Mo = torch.empty(B, NH, 1, dtype=sd, device=q.device)
    Ci, Ni, Mi = (C.contiguous(), n.contiguous(), m.contiguous()) if has_state else (Co, No, Mo)  # else unread
    h = torch.empty(B, NH, DV, dtype=q.dtype, device=q.device)
    _launch(q, k, v, i, f, Ci, Ni, Mi, Co, No, Mo, None, h, h, has_state, False, eps)
    return h, Co, No, Mo


@_step_op.register_fake
def _(q, k, v, i, f, C, n, m, eps):
    B, NH, DK = q.shape
    DV = v.shape[-1]
    sd = C.dtype if C is not None else torch.float32
    return (q.new_empty(B, NH, DV), q.new_empty(B, NH, DK, DV, dtype=sd), q.new_empty(B, NH, DK, dtype=sd),
            q.new_empty(B, NH, 1, dtype=sd))


@torch.library.custom_op("fast_xlstm::mlstm_step_slots_", mutates_args=("C_pool", "n_pool", "m_pool"))
def _step_slots_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Optional[Tensor], C_pool: Tensor, n_pool: Tensor,
                   m_pool: Tensor, slots: Tensor, eps: float) -> Tensor:
    B, NH, _ = q.shape
    if f is None:  # packed gates: the kernel reads both halves of one [B, 2NH] tensor in place
        i, f = i[:, :NH], i[:, NH:]
    h = torch.empty(B, NH, v.shape[-1], dtype=q.dtype, device=q.device)
    _launch(q, k, v, i, f, C_pool, n_pool, m_pool, C_pool, n_pool, m_pool, slots.contiguous(),
            _counters(B * NH, q.device), h, True, True, eps)
    return h


@_step_slots_op.register_fake
def _(q, k, v, i, f, C_pool, n_pool, m_pool, slots, eps):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def mlstm_step_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                      state: MLSTMState | None = None, *, eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent step, functional (same contract as `reference.mlstm_step_torch`).

    q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH]; state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1])
    or None. Returns h [B, NH, DV] in q's dtype and a new state in the state's dtype (fp32 if None).
    A custom op (`fast_xlstm::mlstm_step`): torch.compile keeps it whole. Inference only (no autograd).
    """
    B, NH, DK, DV = _check_step_inputs(q, k, v, i, f)
    if f is None:
        i, f = i[:, :NH], i[:, NH:]
    if state is not None:
        check_state(state, B, NH, DK, DV, "state")
    C, n, m = state if state is not None else (None, None, None)
    h, Co, No, Mo = _step_op(q, k, v, i, f, C, n, m, eps)
    return h, (Co, No, Mo)


def mlstm_step_slots_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor | None,
                      C_pool: torch.Tensor, n_pool: torch.Tensor, m_pool: torch.Tensor, slots: torch.Tensor,
                      *, eps: float = 1e-6) -> torch.Tensor:
    """One recurrent step that updates pool rows in place through slot indices.

    q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH], or i [B, 2NH] holding both gates (input gate
    first) and f None: compiled callers then materialize one gate tensor, where two separate gate
    arguments cost inductor a copy kernel each; C_pool [P, NH, DK, DV], n_pool [P, NH, DK],
    m_pool [P, NH, 1] (contiguous; each fp32 or bf16: C dominates the traffic, so a bf16 C with fp32 n, m
    is the better trade: a bf16 m is quantized to 1/16 at |m| >= 8, which reweighs old state against new
    input by up to ~3% a step); slots int32 [B]: the pool row of each batch row, -1 = skip (row untouched,
    h row = 0). Slots must be distinct apart from -1.
    Returns h [B, NH, DV] in q's dtype. No host sync, no allocation but h after the first call (graph-safe).
    A custom op (`fast_xlstm::mlstm_step_slots_`, mutating the pool): torch.compile keeps it whole.
    """
    B, NH, DK, DV = _check_step_inputs(q, k, v, i, f)
    P = C_pool.shape[0]
    check_state((C_pool, n_pool, m_pool), P, NH, DK, DV, "state pool")
    if not all(x.is_contiguous() for x in (C_pool, n_pool, m_pool)):
        raise ValueError("the state pool tensors must be contiguous (they are updated in place)")
    if slots.shape != (B,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32 tensor of shape [{B}], got {slots.dtype} {tuple(slots.shape)}")
    return _step_slots_op(q, k, v, i, f, C_pool, n_pool, m_pool, slots, eps)
