"""Chunkwise mLSTM forward in Triton: two kernels, the readable spec is `ops/chunkwise_torch.py`.

1. `_fwd_states_kernel`, one program per (sequence, head, DK tile, DV tile): walks the sequence's chunks
   in order, stores the state entering every chunk (C in the input dtype, n and m in fp32) and the final
   state (fp32), and the per-position within-chunk log-decay b and stabilizer m (fp32). Sequential in
   chunks, parallel over tiles: the recurrence is an [BK, L] x [L, BV] tensor-core product per chunk.
2. `_fwd_out_kernel`, one program per (chunk, head, DV tile), all in parallel: the intra-chunk quadratic
   part plus the contribution of the chunk-start state, divided by the normalizer.

The stabilizer follows the spec exactly (so eps enters at the same scale as in the reference):
  m_i = max(b_i + m_prev, max_{j<=i} (b_i - b_j + i~_j)) = b_i + max(m_prev, cummax_{j<=i}(i~_j - b_j)).
Lengths, offsets and chunk counts are run-time values; only tile sizes and head dims are compiled in.

q, k, v and the gates are read through their (batch, head, position) strides, so views such as the
[B, NH, S, D] transpose of a fused [B, S, NH * D] projection need no copy (only the last dim of q, k, v
must be contiguous). The buffers these kernels write (and the backward's inputs) stay contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SeqTables, dot_dtypes, dotcast, launch, logsigmoid, pow2, rtne


@triton.jit
def _seq_origin(SEQ_BASE, r, NH, S):
    """(batch row, first position) of sequence r, from its flat base b * NH * S + start (int64 both)."""
    base = tl.load(SEQ_BASE + r)
    per_b = NH * S
    return base // per_b, base % per_b


# Batch and head strides of the gates depend on S for contiguous gates: not specialized, so one compiled
# variant serves every length (q/k/v strides are multiples of the head dim: specialized, for aligned loads).
@triton.jit(do_not_specialize=["S", "sib", "sih", "sfb", "sfh"])
def _fwd_states_kernel(K, V, I, F, C0, N0, M0, STATE_ROWS, CB, NB, MB, CF, NF, MF, BROW, MROW,
                       SEQ_BASE, SEQ_LEN, CHUNK_OFF, NH, S, n_kt, n_vt,
                       skb, skh, sks, svb, svh, svs, sib, sih, sis, sfb, sfh, sfs,
                       DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_INIT: tl.constexpr, HAS_ROWS: tl.constexpr, IN_DT: tl.constexpr, DOT_DT: tl.constexpr,
                       IP: tl.constexpr, WRITE_ROWS: tl.constexpr):
    """Chunk-start and final states.

    K [B, NH, S, DK], V [B, NH, S, DV] with strides (sxb, sxh, sxs, 1); I, F [B, NH, S] with strides
    (sxb, sxh, sxs). Initial state (any float dtype, read only if HAS_INIT): C0 [P, NH, DK, DV],
    N0 [P, NH, DK], M0 [P, NH] (or [P, NH, 1]), contiguous; sequence r starts from row STATE_ROWS[r]
    (int64 [N]) if HAS_ROWS, else from row r (P = N). Writes CB [NCT, NH, DK, DV] (its dtype),
    NB [NCT, NH, DK], MB [NCT, NH], CF [N, NH, DK, DV], NF [N, NH, DK], MF [N, NH], BROW/MROW [B, NH, S]
    (all fp32, contiguous); BROW/MROW only if WRITE_ROWS (the backward reads them; the forward's
    output kernel derives them from the gates, which keeps that per-chunk [L, L] max off this kernel's
    sequential path); never writes the initial state (padding sequences share its rows).
    """
    pid = tl.program_id(0)
    vt = pid % n_vt
    kt = (pid // n_vt) % n_kt
    rh = pid // (n_vt * n_kt)
    h = rh % NH
    r = rh // NH
    bq, t0 = _seq_origin(SEQ_BASE, r, NH, S)
    row0 = tl.load(SEQ_BASE + r) + h.to(tl.int64) * S  # flat [B, NH, S] row of the fp32 buffers
    seqlen = tl.load(SEQ_LEN + r)
    c0 = tl.load(CHUNK_OFF + r).to(tl.int64)
    nc = tl.cdiv(seqlen, L)

    dk = kt * BK + tl.arange(0, BK)
    dv = vt * BV + tl.arange(0, BV)
    mk, mv = dk < DK, dv < DV
    mkv = mk[:, None] & mv[None, :]
    first_v = vt == 0
    first_kv = (kt == 0) & (vt == 0)
    tile = dk[:, None] * DV + dv[None, :]
    rh64 = r.to(tl.int64) * NH + h
    h64 = h.to(tl.int64)
    k_ptr = K + bq * skb + h64 * skh
    v_ptr = V + bq * svb + h64 * svh
    i_ptr = I + bq * sib + h64 * sih
    f_ptr = F + bq * sfb + h64 * sfh
    if HAS_INIT:
        if HAS_ROWS:
            sh64 = tl.load(STATE_ROWS + r).to(tl.int64) * NH + h  # a pool row, read in place
        else:
            sh64 = rh64
        C = tl.load(C0 + sh64 * (DK * DV) + tile, mask=mkv, other=0.0).to(tl.float32)
        n = tl.load(N0 + sh64 * DK + dk, mask=mk, other=0.0).to(tl.float32)
        m = tl.load(M0 + sh64).to(tl.float32)
    else:
        C = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)
        m = tl.zeros([], dtype=tl.float32)

    t = tl.arange(0, L)
    causal = t[None, :] <= t[:, None]
    for j in range(0, nc):
        ch = (c0 + j) * NH + h  # (global chunk, head) index
        tl.store(CB + ch * (DK * DV) + tile, rtne(C, CB.dtype.element_ty), mask=mkv)
        tl.store(NB + ch * DK + dk, n, mask=mk & first_v)
        tl.store(MB + ch, m, mask=first_kv)

        pos = j * L + t
        valid = pos < seqlen
        rows = row0 + pos
        tok = t0 + pos  # position in the batch row, for the strided inputs
        # Positions past the sequence end can neither add (i = -inf) nor decay (log f = 0).
        ig = tl.load(i_ptr + tok * sis, mask=valid, other=float("-inf")).to(tl.float32)
        lf = tl.where(valid, logsigmoid(tl.load(f_ptr + tok * sfs, mask=valid, other=0.0).to(tl.float32)), 0.0)
        b = tl.cumsum(lf, 0)
        g = tl.sum(lf, 0)
        a = (tl.cumsum(lf, 0, reverse=True) - lf) + ig  # log weight of k_j v_j^T at the chunk end
        # Floor: a chunk of only skipped positions must give weight 0, not exp(-inf + inf).
        a_max = tl.maximum(tl.max(a, 0), -1e30)
        m_new = tl.maximum(g + m, a_max)

        if WRITE_ROWS and first_kv:  # per-position b and stabilizer, once per (sequence, head)
            # m_row = b + max(m, running max of i~ - b): an [L, L] masked max (cheaper than a scan here).
            x = tl.where(causal, (ig - b)[None, :], float("-inf"))
            m_row = b + tl.maximum(m, tl.max(x, 1))
            tl.store(BROW + rows, b, mask=valid)
            tl.store(MROW + rows, m_row, mask=valid)

        # The chunk's k v^T sum is scaled by its own max, so the product does not wait for the running m
        # (only a scalar rescale and an FMA on C sit on the loop-carried path).
        w = tl.where(valid, tl.exp(a - a_max), 0.0)
        kk = tl.load(k_ptr + tok[:, None] * sks + dk[None, :], mask=valid[:, None] & mk[None, :],
                     other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + tok[:, None] * svs + dv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
        kw = kk * w[:, None]
        kv = tl.dot(tl.trans(dotcast(kw, IN_DT, DOT_DT)), dotcast(vv, IN_DT, DOT_DT), input_precision=IP)
        decay = tl.exp(g + m - m_new)
        scale_kv = tl.exp(a_max - m_new)
        C = decay * C + scale_kv * kv
        n = decay * n + scale_kv * tl.sum(kw, 0)
        m = m_new

    tl.store(CF + rh64 * (DK * DV) + tile, C, mask=mkv)
    tl.store(NF + rh64 * DK + dk, n, mask=mk & first_v)
    tl.store(MF + rh64, m, mask=first_kv)


@triton.jit(do_not_specialize=["S", "sib", "sih", "sfb", "sfh", "shb", "shh"])  # one variant for every length
def _fwd_out_kernel(Q, K, V, I, F, CB, NB, MB, BROW, MROW, H, DSUM,
                    SEQ_BASE, SEQ_LEN, CHUNK_SEQ, CHUNK_J, NH, S, n_vt, scale, eps,
                    sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sib, sih, sis, sfb, sfh, sfs, shb, shh, shs,
                    CF, NF, MF, PC, PN, PM, POOL_ROWS,
                    DK: tl.constexpr, DV: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    IN_DT: tl.constexpr, DOT_DT: tl.constexpr, IP: tl.constexpr, ROWS_FROM_GATES: tl.constexpr,
                    STORE_ROWS: tl.constexpr, WRITE_POOL: tl.constexpr):
    """Outputs of one chunk for one DV tile.

    WRITE_POOL: the program of a sequence's last chunk also copies that sequence's final state (CF, NF, MF
    from the states kernel, fp32) into the state pool (PC [P, NH, DK, DV], PN [P, NH, DK], PM [P, NH, 1],
    any float dtype, contiguous) at row POOL_ROWS[r]. This kernel runs after the states kernel has read every
    initial state from the pool, so the write cannot race those reads; the copy rides in a launch that
    runs anyway (a short graph-captured prefill would otherwise replay three copy kernels per layer).

    Q, K [B, NH, S, DK], V [B, NH, S, DV] with strides (sxb, sxh, sxs, 1), I, F [B, NH, S] with strides
    (sib, sih, sis), (sfb, sfh, sfs); reads the buffers written by `_fwd_states_kernel`: with
    ROWS_FROM_GATES the within-chunk log-decay b and stabilizer m come from F and the chunk-start m
    (the same arithmetic as the states kernel's), else from BROW/MROW; with ROWS_FROM_GATES and STORE_ROWS
    the derived rows are written to BROW/MROW [B, NH, S] fp32 (kept for the backward). Writes H [B, NH, S, DV] (its
    dtype) with strides (shb, shh, shs, 1): contiguous, or token-major (the [B, NH, S, DV] view of a
    [B, S, NH, DV] tensor, which the layer's output norm reads as rows of NH * DV), and DSUM [B, NH, S] fp32
    (the signed normalizer sum before max/abs, kept for the backward), contiguous.
    """
    pid = tl.program_id(0)
    vt = pid % n_vt
    c = pid // n_vt
    h = tl.program_id(1)
    r = tl.load(CHUNK_SEQ + c)
    j = tl.load(CHUNK_J + c)
    seqlen = tl.load(SEQ_LEN + r)
    t = tl.arange(0, L)
    valid = j * L + t < seqlen
    rows = tl.load(SEQ_BASE + r) + h.to(tl.int64) * S + j * L + t  # flat [B, NH, S] rows of the fp32 buffers
    bq, t0 = _seq_origin(SEQ_BASE, r, NH, S)
    tok = t0 + j * L + t  # positions in the batch row, for the strided inputs
    h64 = h.to(tl.int64)
    q_ptr = Q + bq * sqb + h64 * sqh
    k_ptr = K + bq * skb + h64 * skh
    v_ptr = V + bq * svb + h64 * svh
    ch = c.to(tl.int64) * NH + h

    ig = tl.load(I + bq * sib + h64 * sih + tok * sis, mask=valid, other=float("-inf")).to(tl.float32)
    m_prev = tl.load(MB + ch)
    causal = t[None, :] <= t[:, None]
    if ROWS_FROM_GATES:
        fg = tl.load(F + bq * sfb + h64 * sfh + tok * sfs, mask=valid, other=0.0).to(tl.float32)
        b = tl.cumsum(tl.where(valid, logsigmoid(fg), 0.0), 0)
        mq = b + tl.maximum(m_prev, tl.max(tl.where(causal, (ig - b)[None, :], float("-inf")), 1))
        if STORE_ROWS:
            tl.store(BROW + rows, b, mask=valid & (vt == 0))
            tl.store(MROW + rows, mq, mask=valid & (vt == 0))
    else:
        b = tl.load(BROW + rows, mask=valid, other=0.0)
        mq = tl.load(MROW + rows, mask=valid, other=0.0)

    dv = vt * BV + tl.arange(0, BV)
    mv = dv < DV
    acc_s = tl.zeros([L, L], dtype=tl.float32)
    acc_h = tl.zeros([L, BV], dtype=tl.float32)
    qn = tl.zeros([L], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        dk = k0 + tl.arange(0, BK)
        mk = dk < DK
        mqk = valid[:, None] & mk[None, :]
        qq = tl.load(q_ptr + tok[:, None] * sqs + dk[None, :], mask=mqk, other=0.0)
        kk = tl.load(k_ptr + tok[:, None] * sks + dk[None, :], mask=mqk, other=0.0)
        cc = tl.load(CB + ch * (DK * DV) + dk[:, None] * DV + dv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        nn = tl.load(NB + ch * DK + dk, mask=mk, other=0.0)
        qd = dotcast(qq, IN_DT, DOT_DT)
        acc_s += tl.dot(qd, tl.trans(dotcast(kk, IN_DT, DOT_DT)), input_precision=IP)
        acc_h += tl.dot(qd, dotcast(cc, IN_DT, DOT_DT), input_precision=IP)
        qn += tl.sum(qq.to(tl.float32) * nn[None, :], 1)

    beta = tl.exp(b + m_prev - mq)
    log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :] - mq[:, None], float("-inf"))
    p = acc_s * scale * tl.exp(log_d)
    dsum = beta * scale * qn + tl.sum(p, 1)
    vv = tl.load(v_ptr + tok[:, None] * svs + dv[None, :], mask=valid[:, None] & mv[None, :], other=0.0)
    acc_h = acc_h * (beta * scale)[:, None] + tl.dot(dotcast(p, IN_DT, DOT_DT), dotcast(vv, IN_DT, DOT_DT),
                                                      input_precision=IP)
    den = tl.maximum(tl.abs(dsum), tl.exp(-mq)) + eps
    out = acc_h / den[:, None]
    h_ptr = H + bq * shb + h64 * shh + tok[:, None].to(tl.int64) * shs + dv[None, :]
    tl.store(h_ptr, rtne(out, H.dtype.element_ty), mask=valid[:, None] & mv[None, :])
    tl.store(DSUM + rows, dsum, mask=valid & (vt == 0))

    if WRITE_POOL:
        if j == tl.cdiv(seqlen, L) - 1:
            rh = r.to(tl.int64) * NH + h64
            ph = tl.load(POOL_ROWS + r).to(tl.int64) * NH + h64
            for k0 in range(0, DK, BK):
                dk = k0 + tl.arange(0, BK)
                mk = dk < DK
                tile = dk[:, None] * DV + dv[None, :]
                cf = tl.load(CF + rh * (DK * DV) + tile, mask=mk[:, None] & mv[None, :], other=0.0)
                tl.store(PC + ph * (DK * DV) + tile, rtne(cf, PC.dtype.element_ty), mask=mk[:, None] & mv[None, :])
                nf = tl.load(NF + rh * DK + dk, mask=mk, other=0.0)
                tl.store(PN + ph * DK + dk, rtne(nf, PN.dtype.element_ty), mask=mk & (vt == 0))
            tl.store(PM + ph, rtne(tl.load(MF + rh), PM.dtype.element_ty), mask=vt == 0)


# Sequence-heads (sequences x heads) from which the states kernel takes its widest DV tiles.
_WIDE_STATE_TILES_FROM = 16


def _state_cfgs(DK: int, DV: int, seq_heads: int = _WIDE_STATE_TILES_FROM) -> list[dict]:
    """Launch configs of `_fwd_states_kernel`, best first for `seq_heads` (sequences x heads) programs'
    worth of recurrences. Each program walks its sequence's chunks in order, so wide DV tiles (fewer
    re-reads of k, one program carrying more of the state) pay off when many sequences keep the GPU
    full, and a single sequence's heads want more, narrower programs. Measured on an H100 at the
    7B head shapes (bench/fwd_kernel_split.py, 65,536 tokens per call): 64x256 tiles 2.3-2.8 ms from
    2 to 128 sequences, against 3.4-4.7 ms for 64x64; one sequence 64x128 4.1 ms against 6.0 ms
    (64x256: 5.9). The rest are fallbacks for GPUs with less shared memory (and fp32 inputs).
    """
    bk = min(64, pow2(DK))
    wide = min(256 if seq_heads >= _WIDE_STATE_TILES_FROM else 128, pow2(DV))
    bv = min(64, pow2(DV))
    return [dict(BK=bk, BV=wide, num_warps=8, num_stages=3), dict(BK=bk, BV=bv, num_warps=4, num_stages=2),
            dict(BK=bk, BV=min(bv, 32), num_warps=4, num_stages=1),
            dict(BK=min(bk, 32), BV=min(bv, 32), num_warps=4, num_stages=1)]


# The output kernel's programs (chunks x heads x DV tiles) below which its DV tiles get narrower: about
# one per SM of an H100 (132).
_OUT_MIN_PROGRAMS = 128


def _out_bv(DV: int, L: int, chunk_heads: int) -> int:
    """The output kernel's DV tile width for `chunk_heads` (chunks x heads) programs per DV tile: 128
    (64 for chunks longer than 64), halved down to 32 while the launch would have fewer than
    _OUT_MIN_PROGRAMS programs. A short prefill (one 64-token chunk of a sequence, 8 heads) otherwise
    runs 32 programs, each of which also copies a 256 x 128 fp32 tile of the final state into the pool:
    a few SMs move all of it while the rest idle."""
    bv = min(128 if L <= 64 else 64, pow2(DV))
    while bv > 32 and chunk_heads * triton.cdiv(DV, bv) < _OUT_MIN_PROGRAMS:
        bv //= 2
    return bv


def _out_cfgs(DK: int, DV: int, L: int, chunk_heads: int = _OUT_MIN_PROGRAMS) -> list[dict]:
    """Launch configs of `_fwd_out_kernel`, best first, for `chunk_heads` programs per DV tile."""
    bk = min(64, pow2(DK))
    bv = _out_bv(DV, L, chunk_heads)
    nw = 4 if L <= 32 or bv <= 32 else 8
    return [dict(BK=bk, BV=bv, num_warps=nw, num_stages=2), dict(BK=bk, BV=min(bv, 64), num_warps=nw, num_stages=1),
            dict(BK=min(bk, 32), BV=min(bv, 32), num_warps=4, num_stages=1)]


def seq_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of q/k/v [B, NH, S, D] (last dim contiguous) or gates [B, NH, S]."""
    if x.dim() == 4 and x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"the kernels need the last dim contiguous, got strides {x.stride()}")
    return x.stride(0), x.stride(1), x.stride(2)


def inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x [B, NH, S, D] as is when its last dim is contiguous (the kernels read it through its strides),
    else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _pool_view(init, N: int, NH: int, state_rows: torch.Tensor | None):
    """The initial state as the kernel reads it: (C0, N0, M0) contiguous, or the given tensors unchanged
    when `state_rows` picks rows of a pool (a copy of a pool would cost a kernel and the pool's memory)."""
    if state_rows is None:
        return tuple(x.contiguous() for x in init)
    if init is None:
        raise ValueError("state_rows needs an initial state (the pool) to pick rows from")
    if not all(x.is_contiguous() for x in init):
        raise ValueError("a state pool read through state_rows must be contiguous")
    if state_rows.dtype != torch.int64 or state_rows.dim() != 1 or state_rows.shape[0] < N:
        raise ValueError(f"state_rows must be int64 [{N}] (one pool row per sequence), got "
                         f"{state_rows.dtype} {tuple(state_rows.shape)}")
    if init[0].shape[1] != NH:
        raise ValueError(f"the pool holds {init[0].shape[1]} heads, the inputs {NH}")
    return tuple(init)


def run_states(k, v, i, f, init, tabs: SeqTables, L: int, state_dtype: torch.dtype,
               state_rows: torch.Tensor | None = None, rows: bool = True, alloc_chunks: int = 0):
    """Runs kernel 1 (also re-run by the backward). init: (C0, N0, M0) or None.

    k [B, NH, S, DK], v [B, NH, S, DV] with contiguous last dims, i, f [B, NH, S], any strides.
    init: (C0 [N, NH, DK, DV], N0 [N, NH, DK], M0 [N, NH] or [N, NH, 1]); with `state_rows` (int64 [N]
    on the device), a contiguous pool (C0 [P, NH, DK, DV], N0 [P, NH, DK], M0 [P, NH, 1]) of which
    sequence r reads row state_rows[r] in place (the pool is never written).
    Returns CB [NCT, NH, DK, DV] (state_dtype), NB [NCT, NH, DK], MB [NCT, NH] (chunk-start states; with
    alloc_chunks > NCT they have that many rows, the rest unset),
    (CF, NF, MF [N, NH]) final state, BROW, MROW [B, NH, S] (None unless `rows`, which the backward
    asks for: the forward's output kernel derives them itself); all fp32 unless said.
    """
    B, NH, S, DK = k.shape
    DV = v.shape[-1]
    dev = k.device
    f32 = torch.float32
    nct = max(tabs.NCT, alloc_chunks)
    CB = torch.empty(nct, NH, DK, DV, device=dev, dtype=state_dtype)
    NB = torch.empty(nct, NH, DK, device=dev, dtype=f32)
    MB = torch.empty(nct, NH, device=dev, dtype=f32)
    CF = torch.empty(tabs.N, NH, DK, DV, device=dev, dtype=f32)
    NF = torch.empty(tabs.N, NH, DK, device=dev, dtype=f32)
    MF = torch.empty(tabs.N, NH, device=dev, dtype=f32)
    BROW = torch.zeros(B, NH, S, device=dev, dtype=f32) if rows else None
    MROW = torch.zeros(B, NH, S, device=dev, dtype=f32) if rows else None
    in_dt, dot_dt, ip = dot_dtypes(k.dtype)
    has_init = init is not None
    has_rows = state_rows is not None
    C0, N0, M0 = _pool_view(init, tabs.N, NH, state_rows) if has_init else (CF, NF, MF)  # else: never read
    row_table = state_rows if has_rows else tabs.seq_base  # a placeholder pointer when there is no row table
    strides = (*seq_strides(k), *seq_strides(v), *seq_strides(i), *seq_strides(f))

    def grid(cfg):
        return (tabs.N * NH * triton.cdiv(DK, cfg["BK"]) * triton.cdiv(DV, cfg["BV"]),)

    brow, mrow = (BROW, MROW) if rows else (MF, MF)  # placeholders, never written without rows

    def args_for(cfg):
        return (k, v, i, f, C0, N0, M0, row_table, CB, NB, MB, CF, NF, MF, brow, mrow, tabs.seq_base,
                tabs.seq_len, tabs.chunk_off, NH, S, triton.cdiv(DK, cfg["BK"]), triton.cdiv(DV, cfg["BV"]),
                *strides, DK, DV, L)

    wide = tabs.N * NH >= _WIDE_STATE_TILES_FROM
    launch(_fwd_states_kernel, grid, args_for, _state_cfgs(DK, DV, tabs.N * NH),
           dict(HAS_INIT=has_init, HAS_ROWS=has_rows, IN_DT=in_dt, DOT_DT=dot_dt, IP=ip, WRITE_ROWS=rows),
           key=(DK, DV, L, k.dtype, state_dtype, has_init, has_rows, wide, rows))
    return CB, NB, MB, (CF, NF, MF), BROW, MROW


def run_out(q, k, v, i, CB, NB, MB, BROW, MROW, tabs: SeqTables, L: int, eps: float, zero_fill: bool = True,
            f: torch.Tensor | None = None, rows_out: tuple[torch.Tensor, torch.Tensor] | None = None,
            final_to_pool=None, token_major: bool = False):
    """Runs kernel 2 (q, k, v with contiguous last dims, i and f any strides). BROW and MROW None: the
    kernel derives them from the forget gates `f`, and writes them into `rows_out` (two fp32 [B, NH, S]
    buffers) when given. final_to_pool: ((CF, NF, MF) fp32 final states [N, ...], (C, n, m) a contiguous
    state pool, rows int64 [N]): the kernel also copies each sequence's final state into pool row
    rows[r] (see `_fwd_out_kernel`).

    Returns h [B, NH, S, DV] in q's dtype, contiguous, or with token_major the [B, NH, S, DV] view of a
    contiguous [B, S, NH, DV] tensor (so h.transpose(1, 2) is contiguous: the layer's per-head norm and
    output gate then read and write plain rows, where the [B, NH, S, DV] layout made them gather),
    and dsum [B, NH, S] fp32, contiguous (zero_fill=False: dsum unset outside the sequences, as h
    always is).
    """
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    if token_major:
        h = torch.empty(B, S, NH, DV, device=q.device, dtype=q.dtype).transpose(1, 2)
    else:
        h = torch.empty(B, NH, S, DV, device=q.device, dtype=q.dtype)
    dsum = (torch.zeros if zero_fill else torch.empty)(B, NH, S, device=q.device, dtype=torch.float32)
    if tabs.NCT == 0:
        return h, dsum
    in_dt, dot_dt, ip = dot_dtypes(q.dtype)
    from_gates = BROW is None
    if from_gates and f is None:
        raise ValueError("run_out needs the forget gates f when BROW/MROW are not given")
    if not from_gates:
        f = i  # a placeholder, never read
    strides = (*seq_strides(q), *seq_strides(k), *seq_strides(v), *seq_strides(i), *seq_strides(f), *seq_strides(h))
    store_rows = from_gates and rows_out is not None
    if store_rows:
        brow, mrow = rows_out
    else:
        brow, mrow = (MB, MB) if from_gates else (BROW, MROW)  # placeholders, never read from gates

    write_pool = final_to_pool is not None
    if write_pool:
        (CF, NF, MF), (PC, PN, PM), pool_rows = final_to_pool
        if not all(t.is_contiguous() for t in (PC, PN, PM)):
            raise ValueError("a state pool written by the output kernel must be contiguous")
        pool_dtypes = (PC.dtype, PN.dtype, PM.dtype)
    else:
        CF = NF = MF = PC = PN = PM = pool_rows = MB  # placeholders, never read or written
        pool_dtypes = None

    def grid(cfg):
        return (tabs.NCT * triton.cdiv(DV, cfg["BV"]), NH)

    def args_for(cfg):
        return (q, k, v, i, f, CB, NB, MB, brow, mrow, h, dsum, tabs.seq_base, tabs.seq_len, tabs.chunk_seq,
                tabs.chunk_j, NH, S, triton.cdiv(DV, cfg["BV"]), DK ** -0.5, eps, *strides,
                CF, NF, MF, PC, PN, PM, pool_rows, DK, DV, L)

    chunk_heads = tabs.NCT * NH
    launch(_fwd_out_kernel, grid, args_for, _out_cfgs(DK, DV, L, chunk_heads),
           dict(IN_DT=in_dt, DOT_DT=dot_dt, IP=ip, ROWS_FROM_GATES=from_gates, STORE_ROWS=store_rows,
                WRITE_POOL=write_pool),
           key=(DK, DV, L, q.dtype, CB.dtype, from_gates, store_rows, pool_dtypes, _out_bv(DV, L, chunk_heads)))
    return h, dsum


def chunk_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunk-start C states are stored in the input dtype: 16-bit inputs meet them in 16-bit tensor-core
    products anyway, and it halves the dominant memory traffic. fp32 inputs keep fp32 states."""
    return torch.float32 if dtype == torch.float32 else dtype


def mlstm_chunkwise_fwd(q, k, v, i, f, init, tabs: SeqTables, L: int, eps: float,
                        state_rows: torch.Tensor | None = None, zero_fill: bool = True, final_to_pool: bool = False,
                        token_major: bool = False):
    """Forward on q, k, v [B, NH, S, D*] with contiguous last dims and gates [B, NH, S] (any strides);
    init and state_rows: see `run_states`; zero_fill=False leaves dsum unset outside the sequences
    (inference: a fill kernel less, which a short prefill's graph would replay per layer);
    final_to_pool (with state_rows): each sequence's final state is also written into the pool row it
    started from; token_major: h in the layout `run_out` describes. Returns h [B, NH, S, DV] (contiguous
    unless token_major), (CF, NF, MF [N, NH]) fp32 and dsum [B, NH, S] fp32."""
    CB, NB, MB, final, _, _ = run_states(k, v, i, f, init, tabs, L, chunk_state_dtype(q.dtype), state_rows,
                                         rows=False)
    to_pool = None
    if final_to_pool:
        if state_rows is None:
            raise ValueError("final_to_pool needs state_rows (the pool rows to write)")
        to_pool = (final, tuple(init), state_rows)
    h, dsum = run_out(q, k, v, i, CB, NB, MB, None, None, tabs, L, eps, zero_fill, f=f, final_to_pool=to_pool,
                      token_major=token_major)
    return h, final, dsum




def kept_chunks(B: int, S: int, N: int, L: int, packed: bool) -> int:
    """Rows of the kept chunk states, known from shapes alone (a traced graph's fake kernel needs them):
    dense input has B * ceil(S / L) chunks; packed input (B = 1) at most ceil(S / L) + N, since each
    sequence adds at most one partial chunk."""
    return -(-S // L) + N if packed else B * -(-S // L)


def mlstm_chunkwise_fwd_train(q, k, v, i, f, init, tabs: SeqTables, L: int, eps: float, keep_states: bool,
                              alloc_chunks: int = 0):
    """The forward as training runs it: `mlstm_chunkwise_fwd` plus what the backward reuses.

    Returns h, (CF, NF, MF), dsum as `mlstm_chunkwise_fwd`, then rows = (BROW, MROW) [B, NH, S] fp32 (each
    position's within-chunk log decay and stabilizer, written by the output kernel at no extra pass) and,
    with keep_states, the chunk-start states (CB [NCT, NH, DK, DV] in the chunk-state dtype, NB [NCT, NH, DK],
    MB [NCT, NH] fp32), else None. Keeping them spares the backward its re-run of the sequential states
    kernel (2.5-4 ms per 7B layer per 65,536 tokens on an H100) for NH * DK * DV / L elements of memory per
    token (32 KiB in bf16 at the 7B head shapes, 64-token chunks). alloc_chunks: see `run_states`.
    """
    B, NH, S, _ = q.shape
    CB, NB, MB, final, _, _ = run_states(k, v, i, f, init, tabs, L, chunk_state_dtype(q.dtype), rows=False,
                                         alloc_chunks=alloc_chunks if keep_states else 0)
    rows = tuple(torch.zeros(B, NH, S, device=q.device, dtype=torch.float32) for _ in range(2))
    h, dsum = run_out(q, k, v, i, CB, NB, MB, None, None, tabs, L, eps, True, f=f, rows_out=rows)
    return h, final, dsum, rows, ((CB, NB, MB) if keep_states else None)
