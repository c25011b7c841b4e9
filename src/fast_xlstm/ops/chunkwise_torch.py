"""Chunkwise-parallel mLSTM in plain torch: the CPU path and the readable spec of the GPU kernel.

The sequence is cut into chunks of L positions. Inside a chunk the quadratic form runs in parallel;
between chunks the (C, n, m) state carries the past. Any length works: the tail is padded inside
with positions that cannot touch the state (i = -inf, f = +inf), so callers never see a padding rule.
Chunks are processed in segments so the per-chunk states never need more than ~256 MB.
Packed variable-length input (`cu_seqlens`) runs each sequence from its own initial state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import (MLSTMState, check_cu_seqlens, check_sequence_inputs, check_state, compute_dtype,
                      zero_state)
from .reference import suffix_log_decay

_SEGMENT_STATE_BYTES = 256 * 2**20


def _segment(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, ic: torch.Tensor, lfc: torch.Tensor,
             state: tuple[torch.Tensor, torch.Tensor, torch.Tensor], eps: float
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One segment of NC chunks, all in the compute dtype.

    qc, kc [B, NH, NC, L, DK] (q already scaled); vc [B, NH, NC, L, DV]; ic, lfc [B, NH, NC, L].
    Returns h [B, NH, NC, L, DV] and the state after the segment.
    """
    NC, L = ic.shape[2], ic.shape[3]
    b = lfc.cumsum(-1)  # log decay from the chunk start to each position
    g = b[..., -1]  # [B, NH, NC]: log decay over the whole chunk
    a = suffix_log_decay(lfc) + ic  # log weight of each position's k v^T at the chunk end
    # Floor: a chunk of only skipped positions (all i = -inf) must give weight 0, not exp(-inf + inf).
    a_max = a.amax(-1).clamp(min=-1e30)  # [B, NH, NC]
    w = torch.exp(a - a_max.unsqueeze(-1)).unsqueeze(-1)  # [B, NH, NC, L, 1]
    kv = (kc * w).transpose(-1, -2) @ vc  # [B, NH, NC, DK, DV]
    ksum = (kc * w).sum(-2)  # [B, NH, NC, DK]

    # Inter-chunk recurrence: the state entering each chunk.
    C, n, m = state
    C_in, n_in, m_in = [], [], []
    for c in range(NC):
        C_in.append(C), n_in.append(n), m_in.append(m)
        m_new = torch.maximum(g[:, :, c, None] + m, a_max[:, :, c, None])  # [B, NH, 1]
        decay = torch.exp(g[:, :, c, None] + m - m_new)
        scale = torch.exp(a_max[:, :, c, None] - m_new)
        C = decay.unsqueeze(-1) * C + scale.unsqueeze(-1) * kv[:, :, c]
        n = decay * n + scale * ksum[:, :, c]
        m = m_new
    C_prev = torch.stack(C_in, 2)  # [B, NH, NC, DK, DV]
    n_prev = torch.stack(n_in, 2)  # [B, NH, NC, DK]
    m_prev = torch.stack(m_in, 2)  # [B, NH, NC, 1]

    # Intra-chunk outputs, all chunks at once.
    causal = torch.ones(L, L, dtype=torch.bool, device=qc.device).tril()
    log_d = (b.unsqueeze(-1) - b.unsqueeze(-2) + ic.unsqueeze(-2)).masked_fill(~causal, -math.inf)
    inter = b.unsqueeze(-1) + m_prev.unsqueeze(-2)  # [B, NH, NC, L, 1]
    m_row = torch.maximum(inter, log_d.amax(-1, keepdim=True))
    beta = torch.exp(inter - m_row)
    scores = (qc @ kc.transpose(-1, -2)) * torch.exp(log_d - m_row)
    num = beta * (qc @ C_prev) + scores @ vc
    qn = (qc @ n_prev.unsqueeze(-1))  # [B, NH, NC, L, 1]
    den = torch.maximum((beta * qn + scores.sum(-1, keepdim=True)).abs(), torch.exp(-m_row)) + eps
    return num / den, (C, n, m)


def _chunkwise_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                     state: MLSTMState, chunk_size: int, eps: float) -> tuple[torch.Tensor, MLSTMState]:
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    cd = compute_dtype(q)
    out_dtype = state[0].dtype
    C, n, m = (x.to(cd) for x in state)
    if S == 0:
        return q.new_zeros(B, NH, 0, DV), (C.to(out_dtype), n.to(out_dtype), m.to(out_dtype))
    L = max(1, min(chunk_size, S))
    pad = (-S) % L
    qf, kf, vf = q.to(cd) * (DK ** -0.5), k.to(cd), v.to(cd)
    ig, fg = i.to(cd), f.to(cd)
    if pad:
        qf, kf, vf = (F.pad(x, (0, 0, 0, pad)) for x in (qf, kf, vf))
        ig = F.pad(ig, (0, pad), value=-math.inf)  # padded positions add nothing ...
        fg = F.pad(fg, (0, pad), value=math.inf)  # ... and decay nothing
    lf = F.logsigmoid(fg)
    NC = (S + pad) // L
    qc, kc, vc = (x.reshape(B, NH, NC, L, x.shape[-1]) for x in (qf, kf, vf))
    ic, lfc = ig.reshape(B, NH, NC, L), lf.reshape(B, NH, NC, L)

    per_chunk_bytes = B * NH * (DK * DV + DK + 1) * torch.finfo(cd).bits // 8 * 2
    seg = max(1, _SEGMENT_STATE_BYTES // max(1, per_chunk_bytes))
    hs = []
    for s0 in range(0, NC, seg):
        sl = slice(s0, min(NC, s0 + seg))
        h, (C, n, m) = _segment(qc[:, :, sl], kc[:, :, sl], vc[:, :, sl], ic[:, :, sl], lfc[:, :, sl],
                                (C, n, m), eps)
        hs.append(h)
    h = torch.cat(hs, dim=2).reshape(B, NH, NC * L, DV)[:, :, :S]
    return h.to(q.dtype), (C.to(out_dtype), n.to(out_dtype), m.to(out_dtype))


def mlstm_chunkwise_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                          initial_state: MLSTMState | None = None, *, cu_seqlens: torch.Tensor | None = None,
                          chunk_size: int = 64, eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """Chunkwise mLSTM over a batch of sequences, or over packed sequences.

    Args:
        q, k: [B, NH, S, DK]; v: [B, NH, S, DV]; i, f: [B, NH, S] gate pre-activations.
        initial_state: (C [N, NH, DK, DV], n [N, NH, DK], m [N, NH, 1]) or None (empty state);
            N = B, or the number of packed sequences when `cu_seqlens` is given.
        cu_seqlens: optional int tensor [N + 1] of offsets into S (requires B = 1): sequence r is
            positions cu_seqlens[r]:cu_seqlens[r+1] and runs from initial_state[r].
        chunk_size: positions per chunk (any positive int; the tail is handled internally).
    Returns:
        h [B, NH, S, DV] in q's dtype and the final state (N sequences) in the dtype of
        `initial_state` (fp32, or fp64 for fp64 inputs, when None).
    """
    B, NH, S, DK, DV = check_sequence_inputs(q, k, v, i, f)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if cu_seqlens is None:
        state = initial_state if initial_state is not None else zero_state(B, NH, DK, DV, compute_dtype(q),
                                                                            q.device)
        check_state(state, B, NH, DK, DV)
        return _chunkwise_dense(q, k, v, i, f, state, chunk_size, eps)

    offs = check_cu_seqlens(cu_seqlens, B, S)
    N = len(offs) - 1
    state = initial_state if initial_state is not None else zero_state(N, NH, DK, DV, compute_dtype(q), q.device)
    check_state(state, N, NH, DK, DV)
    hs, finals = [], []
    for r in range(N):
        a, e = offs[r], offs[r + 1]
        h, st = _chunkwise_dense(q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], i[:, :, a:e], f[:, :, a:e],
                                 tuple(x[r:r + 1] for x in state), chunk_size, eps)
        hs.append(h)
        finals.append(st)
    h = torch.cat(hs, dim=2)
    return h, tuple(torch.cat([st[j] for st in finals], 0) for j in range(3))
