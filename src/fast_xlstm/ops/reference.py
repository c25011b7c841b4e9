"""The mLSTM cell as its definition: the single step, the recurrent loop and the quadratic form.

These are the ground truth every faster form is tested against (run them in float64 for an oracle).
Shapes: B batch, NH heads, S length, DK q/k head dim, DV v head dim.
Gate inputs `i`, `f` are the (soft-capped) pre-activations; q is scaled by DK**-0.5 inside.
A position with i = -inf and f = +inf leaves the state untouched (padding / skipped slots).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import MLSTMState, check_sequence_inputs, check_state, compute_dtype, zero_state


def mlstm_step_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                     state: MLSTMState | None = None, *, eps: float = 1e-6) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent step.

    Args:
        q, k: [B, NH, DK]; v: [B, NH, DV]; i, f: [B, NH] gate pre-activations.
        state: (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1]) or None for the empty state.
    Returns:
        h [B, NH, DV] in q's dtype, and the new state in the dtype of `state`
        (fp32, or fp64 for fp64 inputs, when `state` is None).
    """
    if q.ndim != 3 or k.shape != q.shape or v.ndim != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"step expects q, k [B, NH, DK] and v [B, NH, DV], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, NH, DK = q.shape
    DV = v.shape[-1]
    if i.shape != (B, NH) or f.shape != (B, NH):
        raise ValueError(f"step expects gates i, f of shape [{B}, {NH}], got {tuple(i.shape)}, {tuple(f.shape)}")
    cd = compute_dtype(q)
    if state is None:
        state = zero_state(B, NH, DK, DV, cd, q.device)
    check_state(state, B, NH, DK, DV, "state")
    C0, n0, m0 = state
    out_dtype = C0.dtype
    C0, n0, m0 = C0.to(cd), n0.to(cd), m0.to(cd)
    qf, kf, vf = q.to(cd) * (DK ** -0.5), k.to(cd), v.to(cd)
    ig, lf = i.to(cd).unsqueeze(-1), F.logsigmoid(f.to(cd)).unsqueeze(-1)  # [B, NH, 1]

    m = torch.maximum(lf + m0, ig)
    fa = torch.exp(lf + m0 - m)
    ia = torch.exp(ig - m)
    C = fa.unsqueeze(-1) * C0 + ia.unsqueeze(-1) * (kf.unsqueeze(-1) * vf.unsqueeze(-2))
    n = fa * n0 + ia * kf
    num = torch.einsum("bhk,bhkv->bhv", qf, C)
    den = torch.maximum((qf * n).sum(-1, keepdim=True).abs(), torch.exp(-m)) + eps
    h = (num / den).to(q.dtype)
    return h, (C.to(out_dtype), n.to(out_dtype), m.to(out_dtype))


def mlstm_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    initial_state: MLSTMState | None = None, *, eps: float = 1e-6
                    ) -> tuple[torch.Tensor, MLSTMState]:
    """The recurrent definition, one step at a time.

    Args: q, k [B, NH, S, DK]; v [B, NH, S, DV]; i, f [B, NH, S]; initial_state as in `mlstm_step_torch`.
    Returns: h [B, NH, S, DV] and the final state.
    """
    B, NH, S, DK, DV = check_sequence_inputs(q, k, v, i, f)
    state = initial_state
    if state is None:
        state = zero_state(B, NH, DK, DV, compute_dtype(q), q.device)
    check_state(state, B, NH, DK, DV)
    hs = []
    for t in range(S):
        h, state = mlstm_step_torch(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps=eps)
        hs.append(h)
    h = torch.stack(hs, dim=2) if hs else q.new_zeros(B, NH, 0, DV, dtype=q.dtype)
    return h, state


def suffix_log_decay(log_f: torch.Tensor) -> torch.Tensor:
    """sum_{t > j} log_f[..., t] for each j, as a reversed cumulative sum (more exact than b_L - b_j)."""
    return log_f.flip(-1).cumsum(-1).flip(-1) - log_f


def mlstm_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    initial_state: MLSTMState | None = None, *, eps: float = 1e-6
                    ) -> tuple[torch.Tensor, MLSTMState]:
    """The quadratic (fully parallel) form over the whole sequence, with an initial state.

    Memory is O(S^2) per head: meant for testing and short sequences.
    Args/returns as `mlstm_recurrent`.
    """
    B, NH, S, DK, DV = check_sequence_inputs(q, k, v, i, f)
    cd = compute_dtype(q)
    if initial_state is None:
        initial_state = zero_state(B, NH, DK, DV, cd, q.device)
    check_state(initial_state, B, NH, DK, DV)
    if S == 0:
        return q.new_zeros(B, NH, 0, DV), tuple(x.clone() for x in initial_state)
    out_dtype = initial_state[0].dtype
    C0, n0, m0 = (x.to(cd) for x in initial_state)
    qf, kf, vf = q.to(cd) * (DK ** -0.5), k.to(cd), v.to(cd)
    ig = i.to(cd)
    lf = F.logsigmoid(f.to(cd))
    b = lf.cumsum(-1)  # [B, NH, S]

    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_d = b.unsqueeze(-1) - b.unsqueeze(-2) + ig.unsqueeze(-2)  # [B, NH, S(query), S(key)]
    log_d = log_d.masked_fill(~causal, -math.inf)
    inter = b.unsqueeze(-1) + m0.unsqueeze(-1)  # [B, NH, S, 1]: the initial state's log weight
    m_row = torch.maximum(inter, log_d.amax(-1, keepdim=True))
    beta = torch.exp(inter - m_row)
    scores = (qf @ kf.transpose(-1, -2)) * torch.exp(log_d - m_row)
    num = beta * (qf @ C0) + scores @ vf
    den = torch.maximum((beta * (qf @ n0.unsqueeze(-1)) + scores.sum(-1, keepdim=True)).abs(), torch.exp(-m_row))
    h = (num / (den + eps)).to(q.dtype)

    # Final state: every position's contribution decayed to the end of the sequence.
    g = b[..., -1:]  # [B, NH, 1]
    a = suffix_log_decay(lf) + ig  # [B, NH, S]
    m_new = torch.maximum(g + m0, a.amax(-1, keepdim=True))
    w = torch.exp(a - m_new)  # [B, NH, S]
    decay = torch.exp(g + m0 - m_new)
    C = decay.unsqueeze(-1) * C0 + (kf * w.unsqueeze(-1)).transpose(-1, -2) @ vf
    n = decay * n0 + (kf * w.unsqueeze(-1)).sum(-2)
    return h, (C.to(out_dtype), n.to(out_dtype), m_new.to(out_dtype))
