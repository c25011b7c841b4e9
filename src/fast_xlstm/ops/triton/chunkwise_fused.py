"""Chunkwise mLSTM inference forward in one kernel: the state stays on chip from chunk to chunk.

The two-kernel forward (`chunkwise_fwd`) stores the state entering every chunk and reads it back in a
second, fully parallel kernel. At inference nothing needs those states, and they are the dominant
traffic: NH * DK * DV 16-bit values per chunk, 2 GiB written and read per 7B layer per 65,536 tokens
with 64-token chunks, against 1.5 GiB for q, k, v and h together. Here one program per (sequence, head,
DV tile) walks its sequence's chunks in order holding its [DK, BV] slice of C (fp32) and all of n (fp32)
in registers; per chunk it first writes the chunk's outputs from the state entering it (the output
kernel's arithmetic), then advances the state (the states kernel's arithmetic). q.k is recomputed by
each of the DV-tile programs of a head (they read the same q, k rows at about the same time, so mostly
from L2). Results equal the two-kernel forward's up to summation order inside the products: C enters
the q.C product rounded to the input dtype, as the two-kernel forward stores it.

Final states go to fresh fp32 buffers or straight into a state pool. In the pool, C tiles belong to one
program each; n and m are shared by a head's DV-tile programs, so they are written by the last of them
to finish (a ticket from `step._counters`, acq_rel), after every one has read the initial values.

Sequences that start at or before the previous sequence's first position, when that one is not
empty, are the padding of `planned.plan_values`, which repeats the shortest real sequence (real ones
start at rising positions, equal only after an empty sequence). When the final states go to the pool,
their programs return at once: the real program computes the same values, and a duplicate that started
late would read the state the real one had already written. Otherwise they run, so that every row of
the returned final state is set (the planned forward's contract).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import SeqTables, dot_dtypes, dotcast, launch, logsigmoid, pow2, rtne
from .chunkwise_fwd import _pool_view, _seq_origin, mlstm_chunkwise_fwd, seq_strides
from .step import _counters


@triton.jit(do_not_specialize=["S", "sib", "sih", "sfb", "sfh", "shb", "shh"])  # one variant for every length
def _fwd_fused_kernel(Q, K, V, I, F, C0, N0, M0, STATE_ROWS, H, CF, NF, MF, CNT, SEQ_BASE, SEQ_LEN, NH, S, n_vt,
                      scale, eps, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sib, sih, sis, sfb, sfh, sfs,
                      shb, shh, shs,
                      DK: tl.constexpr, DV: tl.constexpr, DKP: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                      HAS_INIT: tl.constexpr, HAS_ROWS: tl.constexpr, TO_POOL: tl.constexpr,
                      IN_DT: tl.constexpr, DOT_DT: tl.constexpr, IP: tl.constexpr):
    """h and the final state of sequence r, head h, DV tile vt (program (r * NH + h) * n_vt + vt).

    Q, K [B, NH, S, DK], V [B, NH, S, DV] with strides (sxb, sxh, sxs, 1); I, F [B, NH, S] with strides
    (sxb, sxh, sxs); H [B, NH, S, DV] written with strides (shb, shh, shs, 1). Initial state (if HAS_INIT,
    any float dtype, contiguous): C0 [P, NH, DK, DV], N0 [P, NH, DK], M0 [P, NH(, 1)], row STATE_ROWS[r]
    (int64) if HAS_ROWS else row r. Final state: with TO_POOL into the initial state's row (its dtype),
    else CF [N, NH, DK, DV], NF [N, NH, DK], MF [N, NH] fp32. CNT: int32 tickets [>= N * NH], zero.
    """
    pid = tl.program_id(0)
    vt = pid % n_vt
    rh = pid // n_vt
    h = rh % NH
    r = rh // NH
    if TO_POOL and r > 0:  # padding (see the module docstring); an empty sequence shares its successor's start
        if (tl.load(SEQ_BASE + r) <= tl.load(SEQ_BASE + r - 1)) & (tl.load(SEQ_LEN + r - 1) > 0):
            return
    bq, t0 = _seq_origin(SEQ_BASE, r, NH, S)
    seqlen = tl.load(SEQ_LEN + r)
    nc = tl.cdiv(seqlen, L)

    dk = tl.arange(0, DKP)
    dv = vt * BV + tl.arange(0, BV)
    mk, mv = dk < DK, dv < DV
    mkv = mk[:, None] & mv[None, :]
    tile = dk[:, None] * DV + dv[None, :]
    rh64 = r.to(tl.int64) * NH + h
    h64 = h.to(tl.int64)
    q_ptr = Q + bq * sqb + h64 * sqh
    k_ptr = K + bq * skb + h64 * skh
    v_ptr = V + bq * svb + h64 * svh
    i_ptr = I + bq * sib + h64 * sih
    f_ptr = F + bq * sfb + h64 * sfh
    o_ptr = H + bq * shb + h64 * shh
    if HAS_ROWS:
        sh64 = tl.load(STATE_ROWS + r).to(tl.int64) * NH + h  # a pool row, read (and with TO_POOL written) in place
    else:
        sh64 = rh64
    if HAS_INIT:
        C = tl.load(C0 + sh64 * (DK * DV) + tile, mask=mkv, other=0.0).to(tl.float32)
        n = tl.load(N0 + sh64 * DK + dk, mask=mk, other=0.0).to(tl.float32)
        m = tl.load(M0 + sh64).to(tl.float32)
    else:
        C = tl.zeros([DKP, BV], dtype=tl.float32)
        n = tl.zeros([DKP], dtype=tl.float32)
        m = tl.zeros([], dtype=tl.float32)

    t = tl.arange(0, L)
    causal = t[None, :] <= t[:, None]
    for j in range(0, nc):
        pos = j * L + t
        valid = pos < seqlen
        tok = (t0 + pos).to(tl.int64)  # position in the batch row, for the strided inputs
        # Positions past the sequence end can neither add (i = -inf) nor decay (log f = 0).
        ig = tl.load(i_ptr + tok * sis, mask=valid, other=float("-inf")).to(tl.float32)
        lf = tl.where(valid, logsigmoid(tl.load(f_ptr + tok * sfs, mask=valid, other=0.0).to(tl.float32)), 0.0)
        mqk = valid[:, None] & mk[None, :]
        qq = tl.load(q_ptr + tok[:, None] * sqs + dk[None, :], mask=mqk, other=0.0)
        kk = tl.load(k_ptr + tok[:, None] * sks + dk[None, :], mask=mqk, other=0.0)
        vv = tl.load(v_ptr + tok[:, None] * svs + dv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        qd = dotcast(qq, IN_DT, DOT_DT)
        vd = dotcast(vv, IN_DT, DOT_DT)

        # Outputs of this chunk from the state entering it (as `_fwd_out_kernel`).
        b = tl.cumsum(lf, 0)
        mq = b + tl.maximum(m, tl.max(tl.where(causal, (ig - b)[None, :], float("-inf")), 1))
        s = tl.dot(qd, tl.trans(dotcast(kk, IN_DT, DOT_DT)), input_precision=IP)
        qc = tl.dot(qd, dotcast(C, IN_DT, DOT_DT), input_precision=IP)
        qn = tl.sum(qq.to(tl.float32) * n[None, :], 1)
        beta = tl.exp(b + m - mq)
        log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :] - mq[:, None], float("-inf"))
        p = s * scale * tl.exp(log_d)
        dsum = beta * scale * qn + tl.sum(p, 1)
        num = qc * (beta * scale)[:, None] + tl.dot(dotcast(p, IN_DT, DOT_DT), vd, input_precision=IP)
        den = tl.maximum(tl.abs(dsum), tl.exp(-mq)) + eps
        tl.store(o_ptr + tok[:, None] * shs + dv[None, :], rtne(num / den[:, None], H.dtype.element_ty),
                 mask=valid[:, None] & mv[None, :])

        # The state leaving it (as `_fwd_states_kernel`).
        g = tl.sum(lf, 0)
        a = (tl.cumsum(lf, 0, reverse=True) - lf) + ig  # log weight of k_j v_j^T at the chunk end
        a_max = tl.maximum(tl.max(a, 0), -1e30)  # a chunk of skipped positions must add 0, not exp(nan)
        m_new = tl.maximum(g + m, a_max)
        w = tl.where(valid, tl.exp(a - a_max), 0.0)
        kw = kk.to(tl.float32) * w[:, None]
        kv = tl.dot(tl.trans(dotcast(kw, IN_DT, DOT_DT)), vd, input_precision=IP)
        decay = tl.exp(g + m - m_new)
        scale_kv = tl.exp(a_max - m_new)
        C = decay * C + scale_kv * kv
        n = decay * n + scale_kv * tl.sum(kw, 0)
        m = m_new

    if TO_POOL:
        tl.store(C0 + sh64 * (DK * DV) + tile, rtne(C, C0.dtype.element_ty), mask=mkv)
        ticket = tl.atomic_add(CNT + rh64, 1, sem="acq_rel")
        writer = ticket == n_vt - 1  # every program of this head has read the initial n and m
        tl.store(N0 + sh64 * DK + dk, rtne(n, N0.dtype.element_ty), mask=mk & writer)
        tl.store(M0 + sh64, rtne(m, M0.dtype.element_ty), mask=writer)
        tl.atomic_xchg(CNT + rh64, 0, mask=writer, sem="acq_rel")
    else:
        tl.store(CF + rh64 * (DK * DV) + tile, C, mask=mkv)
        tl.store(NF + rh64 * DK + dk, n, mask=mk & (vt == 0))
        tl.store(MF + rh64, m, mask=vt == 0)


# Sequence-heads from which the DV tiles are 64 wide: fewer programs re-reading q and k, each carrying
# more state. Below it 32-wide tiles put more programs on the SMs (one sequence's 8 heads: 128 programs).
_WIDE_TILES_FROM = 32


def _cfgs(DK: int, DV: int, seq_heads: int) -> list[dict]:
    """Launch configs, best guess first; the later ones fit GPUs with less shared memory."""
    wide = min(64 if seq_heads >= _WIDE_TILES_FROM else 32, pow2(DV))
    narrow = min(32, pow2(DV))
    return [dict(BV=wide, num_warps=8, num_stages=2), dict(BV=wide, num_warps=8, num_stages=1),
            dict(BV=narrow, num_warps=4, num_stages=1)]


def fused_forward_enabled() -> bool:
    """Whether the inference forward runs this kernel (FAST_XLSTM_FUSED_FWD=0 selects the two-kernel one)."""
    return os.environ.get("FAST_XLSTM_FUSED_FWD", "1") != "0"


def mlstm_chunkwise_fwd_fused(q, k, v, i, f, init, tabs: SeqTables, L: int, eps: float,
                              state_rows: torch.Tensor | None = None, final_to_pool: bool = False,
                              token_major: bool = False):
    """Inference forward of sequences described by `tabs` (chunk tables unused) in one kernel.

    q, k [B, NH, S, DK], v [B, NH, S, DV] with contiguous last dims, i, f [B, NH, S] any strides; init
    (C0, N0, M0) or None and state_rows: see `chunkwise_fwd.run_states`. final_to_pool (with state_rows):
    the final states go into the pool rows they started from (written in the pool's dtype, after every
    program of a head has read its initial state). Returns h [B, NH, S, DV] in q's dtype (contiguous, or
    token-major: the [B, NH, S, DV] view of a [B, S, NH, DV] tensor; unset outside the sequences) and the
    final (CF [N, NH, DK, DV], NF [N, NH, DK], MF [N, NH]) fp32, or None with final_to_pool.
    """
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    dev = q.device
    if token_major:
        h = torch.empty(B, S, NH, DV, device=dev, dtype=q.dtype).transpose(1, 2)
    else:
        h = torch.empty(B, NH, S, DV, device=dev, dtype=q.dtype)
    if final_to_pool:
        if state_rows is None or init is None:
            raise ValueError("final_to_pool needs state_rows and the pool (the rows to write)")
        CF = NF = MF = None
    else:
        f32 = torch.float32
        CF = torch.empty(tabs.N, NH, DK, DV, device=dev, dtype=f32)
        NF = torch.empty(tabs.N, NH, DK, device=dev, dtype=f32)
        MF = torch.empty(tabs.N, NH, device=dev, dtype=f32)
    if tabs.N == 0:
        return h, (None if final_to_pool else (CF, NF, MF))
    has_init = init is not None
    C0, N0, M0 = _pool_view(init, tabs.N, NH, state_rows) if has_init else (CF, NF, MF)  # else never read
    cf, nf, mf = (C0, N0, M0) if final_to_pool else (CF, NF, MF)
    row_table = state_rows if state_rows is not None else tabs.seq_base  # a placeholder when there is none
    cnt = _counters(tabs.N * NH, dev) if final_to_pool else tabs.seq_base  # placeholder: no tickets without it
    in_dt, dot_dt, ip = dot_dtypes(q.dtype)
    strides = (*seq_strides(q), *seq_strides(k), *seq_strides(v), *seq_strides(i), *seq_strides(f),
               *seq_strides(h))

    def grid(cfg):
        return (tabs.N * NH * triton.cdiv(DV, cfg["BV"]),)

    def args_for(cfg):
        return (q, k, v, i, f, C0, N0, M0, row_table, h, cf, nf, mf, cnt, tabs.seq_base, tabs.seq_len, NH, S,
                triton.cdiv(DV, cfg["BV"]), DK ** -0.5, eps, *strides, DK, DV, pow2(DK), L)

    wide = tabs.N * NH >= _WIDE_TILES_FROM
    pool_dtypes = (C0.dtype, N0.dtype, M0.dtype) if has_init else None
    launch(_fwd_fused_kernel, grid, args_for, _cfgs(DK, DV, tabs.N * NH),
           dict(HAS_INIT=has_init, HAS_ROWS=state_rows is not None, TO_POOL=final_to_pool, IN_DT=in_dt,
                DOT_DT=dot_dt, IP=ip),
           key=(DK, DV, L, q.dtype, pool_dtypes, state_rows is not None, final_to_pool, wide))
    return h, (None if final_to_pool else (CF, NF, MF))


def mlstm_chunkwise_infer(q, k, v, i, f, init, tabs: SeqTables, L: int, eps: float,
                          state_rows: torch.Tensor | None = None, final_to_pool: bool = False,
                          token_major: bool = False):
    """The inference forward: this module's kernel, or the two-kernel forward with FAST_XLSTM_FUSED_FWD=0.
    Arguments and results as `mlstm_chunkwise_fwd_fused`."""
    if fused_forward_enabled():
        return mlstm_chunkwise_fwd_fused(q, k, v, i, f, init, tabs, L, eps, state_rows, final_to_pool, token_major)
    h, final, _ = mlstm_chunkwise_fwd(q, k, v, i, f, init, tabs, L, eps, state_rows=state_rows, zero_fill=False,
                                      final_to_pool=final_to_pool, token_major=token_major)
    return h, (None if final_to_pool else final)
