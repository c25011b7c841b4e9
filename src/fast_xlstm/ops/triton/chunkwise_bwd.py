"""Chunkwise mLSTM backward in Triton.

Gradient semantics (documented contract, checked against autograd through `mlstm_quadratic`):
  * The row stabilizers m_i only rescale numerator and normalizer together; h depends on them through
    eps alone, so the backward treats them as constants (as mlstm_kernels does). The difference to full
    autograd is O(eps / normalizer).
  * The final state's m is a real output (C_final, n_final are stored relative to it), so its gradient
    is routed exactly: through the max m_f = max(g + m_0, max_j a_j) to the winning branch.
  * The initial state's m gets the gradient that makes (C_0 e^{m_0}, n_0 e^{m_0}) consistent:
    dm_0 = <dC_0, C_0> + <dn_0, n_0> (+ the routed final-m gradient when m_0 wins the final max).

With P_ij = D_ij s_ij (s = q^.k), num_i = beta_i C_prev^T q^_i + sum_j P_ij v_j, dsum_i likewise, per chunk:
  dnum_i = dh_i / den_i,   c_i = d(loss)/d(dsum_i) = -(dh_i.h_i) / den_i * sign(dsum_i) [|dsum_i| >= e^{-m_i}]
  dP_ij = dnum_i.v_j + c_i,   ds_ij = dP_ij D_ij,   dlogD_ij = dP_ij P_ij
  dq_i = scale (beta_i (C_prev dnum_i + c_i n_prev) + sum_j ds_ij k_j)
  dk_j = scale sum_i ds_ij q_i + w_j (dC_end v_j + dn_end),   dv_j = sum_i P_ij dnum_i + w_j dC_end^T k_j
  dC_prev = decay dC_end + sum_i scale beta_i q_i dnum_i^T,   dn_prev = decay dn_end + sum_i scale beta_i c_i q_i
Gate gradients need no extra state products: per position the log-weight gradient splits into a row part
dh_i.h_i + c_i dsum_i (exact, from the homogeneity of h in its weights) and a column part
sum_i dlogD_ij + w_j k_j.(dC_end v_j + dn_end) (= d i~_j); then d log f_t = sum_{u >= t} (row_u - col_u)
+ <dC_f, C_f> + <dn_f, n_f> within each sequence.

Kernels: the chunk-start states come from the forward (`mlstm_chunkwise_fwd_train` keeps them) or the
forward's states kernel is re-run to rebuild them; `_bwd_dstate_kernel` runs
the reverse recurrence per (sequence, head, DK tile, DV tile) and stores dC/dn at every chunk end;
`_bwd_dqk_kernel` (per chunk, DK tile) and `_bwd_dv_kernel` (per chunk, DV tile) run in parallel.
The O(S) gate bookkeeping runs in float64 torch, with no host synchronisation (the backward of a training
step keeps the GPU queue full); the final-state routing is skipped when no final-state gradient is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SeqTables, device_ints, dot_dtypes, dotcast, launch, logsigmoid, pow2, rtne
from .chunkwise_fwd import chunk_state_dtype, run_states


@triton.jit
def _chunk_gates(I, F, rows, valid):
    """Gate pre-activations of one chunk -> (i~ with -inf outside, log f with 0 outside, g, a = suffix + i~)."""
    ig = tl.load(I + rows, mask=valid, other=float("-inf")).to(tl.float32)
    lf = tl.where(valid, logsigmoid(tl.load(F + rows, mask=valid, other=0.0).to(tl.float32)), 0.0)
    g = tl.sum(lf, 0)
    a = (tl.cumsum(lf, 0, reverse=True) - lf) + ig
    return ig, g, a


@triton.jit
def _m_end(MB, MF, c, j, nc, r, NH, h):
    """Stabilizer at the end of chunk j: the next chunk's start value, or the final one."""
    has_next = j + 1 < nc
    m_next = tl.load(MB + (c.to(tl.int64) + 1) * NH + h, mask=has_next, other=0.0)
    m_fin = tl.load(MF + r.to(tl.int64) * NH + h)
    return tl.where(has_next, m_next, m_fin)


@triton.jit(do_not_specialize=["S"])  # one compiled variant for every length
def _bwd_dstate_kernel(Q, I, F, DH, DEN, CC, BROW, MROW, MB, MF, DCF, DNF, DCB, DNB, DC0, DN0,
                       SEQ_BASE, SEQ_LEN, CHUNK_OFF, NH, S, n_kt, n_vt, scale,
                       DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       IN_DT: tl.constexpr, DOT_DT: tl.constexpr, IP: tl.constexpr):
    """Reverse recurrence of the state gradient.

    DCF [N, NH, DK, DV], DNF [N, NH, DK] fp32: gradient of the final state. Writes DCB [NCT, NH, DK, DV]
    (its dtype) / DNB [NCT, NH, DK] fp32: gradient of the state at the END of each chunk, and DC0, DN0
    (fp32, like DCF/DNF): gradient of the initial state.
    """
    pid = tl.program_id(0)
    vt = pid % n_vt
    kt = (pid // n_vt) % n_kt
    rh = pid // (n_vt * n_kt)
    h = rh % NH
    r = rh // NH
    row0 = tl.load(SEQ_BASE + r) + h.to(tl.int64) * S
    seqlen = tl.load(SEQ_LEN + r)
    c0 = tl.load(CHUNK_OFF + r)
    nc = tl.cdiv(seqlen, L)

    dk = kt * BK + tl.arange(0, BK)
    dv = vt * BV + tl.arange(0, BV)
    mk, mv = dk < DK, dv < DV
    mkv = mk[:, None] & mv[None, :]
    tile = dk[:, None] * DV + dv[None, :]
    rh64 = r.to(tl.int64) * NH + h
    dC = tl.load(DCF + rh64 * (DK * DV) + tile, mask=mkv, other=0.0)
    dn = tl.load(DNF + rh64 * DK + dk, mask=mk, other=0.0)
    t = tl.arange(0, L)
    for jj in range(0, nc):
        j = nc - 1 - jj
        c = c0 + j
        ch = c.to(tl.int64) * NH + h
        tl.store(DCB + ch * (DK * DV) + tile, rtne(dC, DCB.dtype.element_ty), mask=mkv)
        tl.store(DNB + ch * DK + dk, dn, mask=mk & (vt == 0))

        pos = j * L + t
        valid = pos < seqlen
        rows = row0 + pos
        ig, g, a = _chunk_gates(I, F, rows, valid)
        m_prev = tl.load(MB + ch)
        m_end = _m_end(MB, MF, c, j, nc, r, NH, h)
        b = tl.load(BROW + rows, mask=valid, other=0.0)
        mq = tl.load(MROW + rows, mask=valid, other=0.0)
        den = tl.load(DEN + rows, mask=valid, other=1.0)
        cc = tl.load(CC + rows, mask=valid, other=0.0)
        beta = tl.where(valid, tl.exp(b + m_prev - mq) * scale, 0.0)
        qq = tl.load(Q + rows[:, None] * DK + dk[None, :], mask=valid[:, None] & mk[None, :], other=0.0).to(tl.float32)
        dh = tl.load(DH + rows[:, None] * DV + dv[None, :], mask=valid[:, None] & mv[None, :], other=0.0).to(tl.float32)
        qb = qq * beta[:, None]
        decay = tl.exp(g + m_prev - m_end)
        dC = decay * dC + tl.dot(tl.trans(dotcast(qb, IN_DT, DOT_DT)), dotcast(dh / den[:, None], IN_DT, DOT_DT),
                                 input_precision=IP)
        dn = decay * dn + tl.sum(qb * cc[:, None], 0)

    tl.store(DC0 + rh64 * (DK * DV) + tile, dC, mask=mkv)
    tl.store(DN0 + rh64 * DK + dk, dn, mask=mk & (vt == 0))


@triton.jit
def _chunk_head(I, F, BROW, MROW, DEN, MB, MF, SEQ_BASE, SEQ_LEN, CHUNK_SEQ, CHUNK_J, c, h, NH, S,
                L: tl.constexpr):
    """Per-position data of chunk c (head h) shared by the parallel backward kernels."""
    r = tl.load(CHUNK_SEQ + c)
    j = tl.load(CHUNK_J + c)
    seqlen = tl.load(SEQ_LEN + r)
    nc = tl.cdiv(seqlen, L)
    t = tl.arange(0, L)
    valid = j * L + t < seqlen
    rows = tl.load(SEQ_BASE + r) + h.to(tl.int64) * S + j * L + t
    ig, g, a = _chunk_gates(I, F, rows, valid)
    b = tl.load(BROW + rows, mask=valid, other=0.0)
    mq = tl.load(MROW + rows, mask=valid, other=0.0)
    den = tl.load(DEN + rows, mask=valid, other=1.0)
    m_end = _m_end(MB, MF, c, j, nc, r, NH, h)
    w = tl.where(valid, tl.exp(a - m_end), 0.0)
    # Rows past the sequence end must be masked here too, not only by their zero q / dh: they load b = mq = 0,
    # so their log weight for a valid column j is i~_j - b_j, which overflows exp() to inf once the in-chunk
    # log decay b_j drops below about -(88 - i~_j) (e.g. ~6 forget gates at the -15 cap). 0 * inf = NaN in
    # those rows of P / dS then reaches every valid column through the transposed products (dk, dv) and the
    # column sums (di, df): NaN gradients in the last, partial chunk of a sequence (any packed input).
    causal = (t[None, :] <= t[:, None]) & valid[:, None]
    d = tl.exp(tl.where(causal, b[:, None] - b[None, :] + ig[None, :] - mq[:, None], float("-inf")))
    return rows, valid, b, mq, den, w, d


@triton.jit(do_not_specialize=["S", "BS"])  # one compiled variant for every length
def _bwd_dqk_kernel(Q, K, V, I, F, DH, DEN, CC, BROW, MROW, CB, NB, MB, MF, DCB, DNB, DQ, DK_, COL, DA,
                    SEQ_BASE, SEQ_LEN, CHUNK_SEQ, CHUNK_J, NH, S, n_kt, BS, scale,
                    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, IP: tl.constexpr):
    """dq, dk for one chunk and DK tile; also the column part of the gate gradient.

    Writes DQ, DK_ [B, NH, S, DK] (their dtype); COL [B, NH, S] fp32 = sum_i dlogD_ij (by DK tile 0);
    DA [n_kt, B, NH, S] fp32 = this tile's share of w_j k_j.(dC_end v_j + dn_end). BS = B * NH * S.
    """
    pid = tl.program_id(0)
    kt = pid % n_kt
    c = pid // n_kt
    h = tl.program_id(1)
    rows, valid, b, mq, den, w, d = _chunk_head(I, F, BROW, MROW, DEN, MB, MF, SEQ_BASE, SEQ_LEN, CHUNK_SEQ,
                                                CHUNK_J, c, h, NH, S, L)
    ch = c.to(tl.int64) * NH + h
    cc = tl.load(CC + rows, mask=valid, other=0.0)
    beta = tl.where(valid, tl.exp(b + tl.load(MB + ch) - mq), 0.0)
    dk = kt * BK + tl.arange(0, BK)
    mk = dk < DK

    dp = tl.zeros([L, L], dtype=tl.float32)
    dq_state = tl.zeros([L, BK], dtype=tl.float32)
    dk_state = tl.zeros([L, BK], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        mv = dv < DV
        mlv = valid[:, None] & mv[None, :]
        dnum = tl.load(DH + rows[:, None] * DV + dv[None, :], mask=mlv, other=0.0).to(tl.float32) / den[:, None]
        vv = dotcast(tl.load(V + rows[:, None] * DV + dv[None, :], mask=mlv, other=0.0), IN_DT, DOT_DT)
        tile = ch * (DK * DV) + dk[:, None] * DV + dv[None, :]
        mkv = mk[:, None] & mv[None, :]
        cst = dotcast(tl.load(CB + tile, mask=mkv, other=0.0), IN_DT, DOT_DT)
        dcst = dotcast(tl.load(DCB + tile, mask=mkv, other=0.0), IN_DT, DOT_DT)
        dnd = dotcast(dnum, IN_DT, DOT_DT)
        dp += tl.dot(dnd, tl.trans(vv), input_precision=IP)
        dq_state += tl.dot(dnd, tl.trans(cst), input_precision=IP)
        dk_state += tl.dot(vv, tl.trans(dcst), input_precision=IP)

    s = tl.zeros([L, L], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        dkk = k0 + tl.arange(0, BK)
        mqk = valid[:, None] & (dkk < DK)[None, :]
        qq = tl.load(Q + rows[:, None] * DK + dkk[None, :], mask=mqk, other=0.0)
        kk = tl.load(K + rows[:, None] * DK + dkk[None, :], mask=mqk, other=0.0)
        s += tl.dot(dotcast(qq, IN_DT, DOT_DT), tl.trans(dotcast(kk, IN_DT, DOT_DT)), input_precision=IP)

    dp = dp + cc[:, None]
    ds = dp * d
    mqk = valid[:, None] & mk[None, :]
    qq = tl.load(Q + rows[:, None] * DK + dk[None, :], mask=mqk, other=0.0)
    kk = tl.load(K + rows[:, None] * DK + dk[None, :], mask=mqk, other=0.0)
    n_prev = tl.load(NB + ch * DK + dk, mask=mk, other=0.0)
    dn_end = tl.load(DNB + ch * DK + dk, mask=mk, other=0.0)
    dsd = dotcast(ds, IN_DT, DOT_DT)
    dq = scale * (beta[:, None] * (dq_state + cc[:, None] * n_prev[None, :])
                  + tl.dot(dsd, dotcast(kk, IN_DT, DOT_DT), input_precision=IP))
    dk_kv = w[:, None] * (dk_state + dn_end[None, :])
    dkv = scale * tl.dot(tl.trans(dsd), dotcast(qq, IN_DT, DOT_DT), input_precision=IP) + dk_kv
    tl.store(DQ + rows[:, None] * DK + dk[None, :], rtne(dq, DQ.dtype.element_ty), mask=mqk)
    tl.store(DK_ + rows[:, None] * DK + dk[None, :], rtne(dkv, DK_.dtype.element_ty), mask=mqk)
    tl.store(DA + kt.to(tl.int64) * BS + rows, tl.sum(dk_kv * kk.to(tl.float32), 1), mask=valid)
    p = s * scale * d
    tl.store(COL + rows, tl.sum(dp * p, 0), mask=valid & (kt == 0))


@triton.jit(do_not_specialize=["S"])  # one compiled variant for every length
def _bwd_dv_kernel(Q, K, I, F, DH, DEN, BROW, MROW, MB, MF, DCB, DV_,
                   SEQ_BASE, SEQ_LEN, CHUNK_SEQ, CHUNK_J, NH, S, n_vt, scale,
                   DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   IN_DT: tl.constexpr, DOT_DT: tl.constexpr, IP: tl.constexpr):
    """dv for one chunk and DV tile. Writes DV_ [B, NH, S, DV] (its dtype)."""
    pid = tl.program_id(0)
    vt = pid % n_vt
    c = pid // n_vt
    h = tl.program_id(1)
    rows, valid, b, mq, den, w, d = _chunk_head(I, F, BROW, MROW, DEN, MB, MF, SEQ_BASE, SEQ_LEN, CHUNK_SEQ,
                                                CHUNK_J, c, h, NH, S, L)
    ch = c.to(tl.int64) * NH + h
    dv = vt * BV + tl.arange(0, BV)
    mv = dv < DV
    s = tl.zeros([L, L], dtype=tl.float32)
    dv_state = tl.zeros([L, BV], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DK
        mqk = valid[:, None] & mk[None, :]
        qq = tl.load(Q + rows[:, None] * DK + dk[None, :], mask=mqk, other=0.0)
        kk = dotcast(tl.load(K + rows[:, None] * DK + dk[None, :], mask=mqk, other=0.0), IN_DT, DOT_DT)
        dcst = tl.load(DCB + ch * (DK * DV) + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        s += tl.dot(dotcast(qq, IN_DT, DOT_DT), tl.trans(kk), input_precision=IP)
        dv_state += tl.dot(kk, dotcast(dcst, IN_DT, DOT_DT), input_precision=IP)
    p = s * scale * d
    mlv = valid[:, None] & mv[None, :]
    dnum = tl.load(DH + rows[:, None] * DV + dv[None, :], mask=mlv, other=0.0).to(tl.float32) / den[:, None]
    out = tl.dot(tl.trans(dotcast(p, IN_DT, DOT_DT)), dotcast(dnum, IN_DT, DOT_DT), input_precision=IP)
    out += w[:, None] * dv_state
    tl.store(DV_ + rows[:, None] * DV + dv[None, :], rtne(out, DV_.dtype.element_ty), mask=mlv)


@triton.jit
def _rowdot_kernel(A, B_, OUT, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """OUT[r] = sum_d A[r, d] * B_[r, d] in fp32, for R rows of length D (dh.h without fp32 copies)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    mr = r < R
    acc = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        m = mr[:, None] & (d < D)[None, :]
        off = r.to(tl.int64)[:, None] * D + d[None, :]
        a = tl.load(A + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * tl.load(B_ + off, mask=m, other=0.0).to(tl.float32), 1)
    tl.store(OUT + r, acc, mask=mr)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a * b).sum(-1) in fp32 for contiguous [..., D] tensors."""
    D = a.shape[-1]
    R = a.numel() // max(D, 1)
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    if R:
        BR, BD = 32, min(128, pow2(D))
        _rowdot_kernel[(triton.cdiv(R, BR),)](a, b, out, R, D=D, BR=BR, BD=BD, num_warps=4)
    return out


def _dstate_cfgs(DK, DV):
    bk, bv = min(64, pow2(DK)), min(64, pow2(DV))
    return [dict(BK=bk, BV=bv, num_warps=4, num_stages=2), dict(BK=min(bk, 32), BV=min(bv, 32), num_warps=4,
                                                                  num_stages=1)]


def _par_cfgs(DK, DV, L, wide: str):
    """Tiles of the parallel kernels; `wide` names the dimension the grid splits ("k" for dq/dk, "v" for dv):
    a wider split tile means fewer programs recomputing q k^T over all of DK. With 64-token chunks the
    dq/dk kernel runs best with 4 warps (H100, 7B head shapes, bench/bwd_kernel_split.py: the backward
    1.5-2.7 ms faster than with 8, at 512 to 65k context); with 128-token chunks 4 warps made the
    whole forward+backward 1.5x slower (bench/results/h100-kernels-bccb2fa), so those keep 8."""
    bk, bv = min(64, pow2(DK)), min(64, pow2(DV))
    if wide == "v" and L <= 64:
        bv = min(128, pow2(DV))
    nw = 4 if L <= 32 or (wide == "k" and L <= 64) else 8
    return [dict(BK=bk, BV=bv, num_warps=nw, num_stages=2), dict(BK=bk, BV=min(bv, 32), num_warps=nw, num_stages=1),
            dict(BK=min(bk, 32), BV=min(bv, 32), num_warps=4, num_stages=1)]




def _segments(tabs: SeqTables, B: int, S: int, device):
    """(seg_id [B*S] int64, seg_end [B*S] int64: one past the last flat position of each position's sequence)."""
    if tabs.offsets is None:
        pos = torch.arange(B * S, device=device)
        seg = pos // S
        return seg, (seg + 1) * S
    offs = device_ints(tabs.offsets, device)
    lens = offs[1:] - offs[:-1]
    seg = torch.repeat_interleave(torch.arange(tabs.N, device=device), lens, output_size=S)
    return seg, offs[1:][seg]


def _seg_revcumsum(x: torch.Tensor, seg_end: torch.Tensor) -> torch.Tensor:
    """Reverse cumulative sum within sequences: x [NH, T] (flat positions), seg_end [T]."""
    R = x.flip(-1).cumsum(-1).flip(-1)
    R = torch.cat([R, R.new_zeros(R.shape[0], 1)], -1)
    return R[:, :-1] - R[:, seg_end]


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> per (sequence, head) over the trailing state dims, as fp64 [N, NH] (a batched product: no
    full-size temporaries)."""
    N, NH = a.shape[:2]
    a2, b2 = a.float().reshape(N * NH, 1, -1), b.float().reshape(N * NH, -1, 1)
    return torch.bmm(a2, b2).reshape(N, NH).double()


def _seq_max_first(a: torch.Tensor, seg: torch.Tensor, tabs: SeqTables, B: int, S: int):
    """Per sequence: the max of a [NH, T] over its positions and the first flat position holding it.
    Returns (amax [NH, N] fp64, -inf for an empty sequence; jstar [NH, N] int64, T for an empty one)."""
    NH, T = a.shape
    if tabs.offsets is None:  # dense: a reshape, no atomics (one long sequence would serialise them)
        a3 = a.reshape(NH, B, S)
        amax = a3.amax(-1)
        first = (a3 == amax[..., None]).to(torch.uint8).argmax(-1)  # argmax returns the first maximum
        return amax, first + torch.arange(B, device=a.device) * S
    N = tabs.N
    segx = seg.expand(NH, T)
    amax = torch.full((NH, N), float("-inf"), dtype=a.dtype, device=a.device).scatter_reduce(1, segx, a, "amax")
    pos = torch.arange(T, device=a.device).expand(NH, T)
    is_max = a == amax.gather(1, segx)
    jstar = torch.full((NH, N), T, dtype=torch.int64, device=a.device).scatter_reduce(
        1, segx, torch.where(is_max, pos, T), "amin")
    return amax, jstar


def gate_grads(i, f, m0, Cf, nf, mf, dCf, dnf, dmf, dhh, cc, dsum, col, da, tabs: SeqTables):
    """Gate gradients and the routed final-m gradient (float64 bookkeeping over positions).

    i, f [B, NH, S]; m0 [N, NH] or None; final state fp32 (mf [N, NH]) and its gradients (each None when
    the loss does not use it); dhh, cc, dsum, col [B, NH, S] fp32; da [n_kt, B, NH, S].
    Returns (di, df [B, NH, S] fp32, dm0_route [N, NH] fp64).
    """
    B, NH, S = i.shape
    N = tabs.N
    d64 = torch.float64
    flat = lambda x: x.to(d64).permute(1, 0, 2).reshape(NH, B * S)
    seg, seg_end = _segments(tabs, B, S, i.device)
    T = B * S
    ig, fg = flat(i), flat(f)
    colpart = flat(col) + flat(da.sum(0))
    rowpart = flat(dhh) + flat(cc) * flat(dsum)
    # Within each sequence: d log f_t = sum_{u >= t} (row_u - col_u) + <dC_f, C_f> + <dn_f, n_f>.
    phi = torch.zeros(N, NH, dtype=d64, device=i.device)
    if dCf is not None:
        phi = phi + _inner(dCf, Cf)
    if dnf is not None:
        phi = phi + _inner(dnf, nf)
    dlf = _seg_revcumsum(rowpart - colpart, seg_end)
    di = colpart.clone()
    dm0_route = torch.zeros(N, NH, dtype=d64, device=i.device)
    unflat = lambda x: x.reshape(NH, B, S).permute(1, 0, 2).float().contiguous()
    if dCf is None and dnf is None and dmf is None:  # phi = 0 and nothing to route (a training loss on h)
        return unflat(di), unflat(dlf * torch.sigmoid(-fg)), dm0_route
    dlf = dlf + phi.t()[:, seg]

    # Final m: m_f = max(g + m0, max_j a_j); route delta = dm_f - phi to the winner.
    dmf64 = torch.zeros(N, NH, dtype=d64, device=i.device) if dmf is None else dmf.to(d64)
    delta = (dmf64 - phi).t()  # [NH, N]
    lf = torch.nn.functional.logsigmoid(fg)
    suffix = _seg_revcumsum(lf, seg_end)  # sum_{u >= t} log f_u within the sequence
    a = suffix - lf + ig  # [NH, T]
    amax, jstar = _seq_max_first(a, seg, tabs, B, S)
    if tabs.offsets is None:
        starts = torch.arange(N, device=i.device) * S
        gseq = suffix[:, starts]  # total log decay of each sequence
    else:
        starts = device_ints(tabs.offsets[:-1], i.device).clamp(max=T - 1)
        nonempty = device_ints([int(b > a_) for a_, b in zip(tabs.offsets, tabs.offsets[1:])], i.device) > 0
        gseq = torch.where(nonempty, suffix[:, starts], 0.0)
    m0t = torch.zeros(NH, N, dtype=d64, device=i.device) if m0 is None else m0.to(d64).reshape(N, NH).t()
    state_wins = (gseq + m0t) >= amax  # [NH, N]
    segx = seg.expand(NH, T)
    pos = torch.arange(T, device=i.device).expand(NH, T)
    route = torch.where(state_wins.gather(1, segx), True, pos > jstar.gather(1, segx))
    dlf = dlf + delta.gather(1, segx) * route
    hit = (~state_wins) & (jstar < T)
    di.scatter_add_(1, jstar.clamp(max=T - 1), torch.where(hit, delta, 0.0))
    df = dlf * torch.sigmoid(-fg)
    return unflat(di), unflat(df), torch.where(state_wins, delta, 0.0).t()


def mlstm_chunkwise_bwd(q, k, v, i, f, init, h, dsum, final, dh, dCf, dnf, dmf, tabs: SeqTables, L: int, eps: float,
                        rows=None, states=None):
    """Gradients of the chunkwise forward (contiguous inputs; final = (Cf, nf, mf [N, NH]) fp32).

    dCf, dnf, dmf: gradients of the final state, each None when the loss does not depend on it.
    rows (BROW, MROW) and states (CB, NB, MB): what `mlstm_chunkwise_fwd_train` kept; states None re-runs
    the states kernel (rows None: that re-run writes them too).
    Returns dq, dk, dv (input dtypes), di, df (fp32 [B, NH, S]), dC0, dn0 (fp32), dm0 [N, NH] fp32.
    """
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    dev = q.device
    f32 = torch.float32
    scale = DK ** -0.5
    in_dt, dot_dt, ip = dot_dtypes(q.dtype)
    fixed = dict(IN_DT=in_dt, DOT_DT=dot_dt, IP=ip)
    sd = chunk_state_dtype(q.dtype)
    Cf, nf, mf = final
    MF = mf.contiguous()
    if states is None:
        CB, NB, MB, _, BROW, MROW = run_states(k, v, i, f, init, tabs, L, sd, rows=rows is None)
    else:
        CB, NB, MB = states
    if rows is not None:
        BROW, MROW = rows

    mrow_exp = torch.exp(-MROW)
    den = torch.maximum(dsum.abs(), mrow_exp) + eps
    dh = dh.contiguous()
    dhh = _rowdot(dh, h.contiguous())
    cc = torch.where(dsum.abs() >= mrow_exp, -dhh / den * torch.sign(dsum), 0.0)

    DCB = torch.empty(tabs.NCT, NH, DK, DV, device=dev, dtype=sd)
    DNB = torch.empty(tabs.NCT, NH, DK, device=dev, dtype=f32)
    dC0 = torch.empty(tabs.N, NH, DK, DV, device=dev, dtype=f32)
    dn0 = torch.empty(tabs.N, NH, DK, device=dev, dtype=f32)
    # The state-gradient recurrence starts from the final state's gradient (zeros when the loss ignores it).
    dCf_ = torch.zeros_like(Cf, dtype=f32) if dCf is None else dCf.float().contiguous()
    dnf_ = torch.zeros_like(nf, dtype=f32) if dnf is None else dnf.float().contiguous()
    launch(_bwd_dstate_kernel,
           lambda cfg: (tabs.N * NH * triton.cdiv(DK, cfg["BK"]) * triton.cdiv(DV, cfg["BV"]),),
           lambda cfg: (q, i, f, dh, den, cc, BROW, MROW, MB, MF, dCf_, dnf_, DCB, DNB, dC0, dn0, tabs.seq_base,
                        tabs.seq_len, tabs.chunk_off, NH, S, triton.cdiv(DK, cfg["BK"]), triton.cdiv(DV, cfg["BV"]),
                        scale, DK, DV, L),
           _dstate_cfgs(DK, DV), fixed, key=(DK, DV, L, q.dtype))

    dq, dk_, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    col = torch.zeros(B, NH, S, device=dev, dtype=f32)
    if tabs.NCT:
        n_kt_max = triton.cdiv(DK, 16)
        da = torch.zeros(n_kt_max, B, NH, S, device=dev, dtype=f32)
        launch(_bwd_dqk_kernel, lambda cfg: (tabs.NCT * triton.cdiv(DK, cfg["BK"]), NH),
               lambda cfg: (q, k, v, i, f, dh, den, cc, BROW, MROW, CB, NB, MB, MF, DCB, DNB, dq, dk_, col, da,
                            tabs.seq_base, tabs.seq_len, tabs.chunk_seq, tabs.chunk_j, NH, S,
                            triton.cdiv(DK, cfg["BK"]), B * NH * S, scale, DK, DV, L),
               _par_cfgs(DK, DV, L, "k"), fixed, key=(DK, DV, L, q.dtype))
        launch(_bwd_dv_kernel, lambda cfg: (tabs.NCT * triton.cdiv(DV, cfg["BV"]), NH),
               lambda cfg: (q, k, i, f, dh, den, BROW, MROW, MB, MF, DCB, dv, tabs.seq_base, tabs.seq_len,
                            tabs.chunk_seq, tabs.chunk_j, NH, S, triton.cdiv(DV, cfg["BV"]), scale, DK, DV, L),
               _par_cfgs(DK, DV, L, "v"), fixed, key=(DK, DV, L, q.dtype))
    else:
        da = torch.zeros(1, B, NH, S, device=dev, dtype=f32)
        dq.zero_(), dk_.zero_(), dv.zero_()

    m0 = None if init is None else init[2]
    di, df, dm0_route = gate_grads(i, f, m0, Cf, nf, mf, dCf, dnf, dmf, dhh, cc, dsum, col, da, tabs)
    dm0 = dm0_route
    if init is not None:
        C0, n0 = init[0], init[1]
        dm0 = dm0 + _inner(dC0, C0) + _inner(dn0, n0)
    return dq, dk_, dv, di, df, dC0, dn0, dm0.float()
