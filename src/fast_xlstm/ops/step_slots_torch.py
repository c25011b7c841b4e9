"""Decode step on rows of a state pool, addressed by slot indices (plain-torch twin of the kernel).

A pool holds P sequences' states: C [P, NH, DK, DV], n [P, NH, DK], m [P, NH, 1]. Row b of the
batch reads and writes pool row slots[b]; slot -1 means "skip" (padding rows of a CUDA-graph
bucket): its pool rows are untouched and its h is zeros. The Triton kernel updates rows in place;
this twin gathers, steps and scatters, with shapes fixed so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .reference import mlstm_step_torch


def check_pool(C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
               slots: torch.Tensor) -> None:
    B, NH, DK = q.shape
    P, DV = C.shape[0], v.shape[-1]
    if C.shape != (P, NH, DK, DV) or n.shape != (P, NH, DK) or m.shape != (P, NH, 1):
        raise ValueError(f"state pool must be C [P, {NH}, {DK}, {DV}], n [P, {NH}, {DK}], m [P, {NH}, 1]; got "
                         f"{tuple(C.shape)}, {tuple(n.shape)}, {tuple(m.shape)}")
    if slots.shape != (B,) or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slots must be an int32/int64 tensor of shape [{B}], got {slots.dtype} {tuple(slots.shape)}")


def mlstm_step_slots_torch_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                            f: torch.Tensor | None, C: torch.Tensor, n: torch.Tensor, m: torch.Tensor,
                            slots: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """One step for B rows whose states live in pool rows `slots` (updated in place).

    Args:
        q, k [B, NH, DK]; v [B, NH, DV]; i, f [B, NH] (or i [B, 2NH] = input | forget gate and f
        None); pool C, n, m as above (fp32 or bf16);
        slots [B] int32/int64, -1 = skip.
    Returns:
        h [B, NH, DV] in q's dtype (zeros for skipped rows).
    """
    if f is None:
        i, f = i.split(q.shape[1], dim=-1)
    check_pool(C, n, m, q, v, slots)
    valid = slots >= 0
    rows = slots.clamp_min(0).long()
    h, (C1, n1, m1) = mlstm_step_torch(q, k, v, i, f, (C[rows], n[rows], m[rows]), eps=eps)
    # index_copy_ needs a fixed shape, so skipped rows must write somewhere. They write exactly what
    # the first valid row writes, to the same pool row: duplicate indices then carry identical values,
    # so the result is deterministic on every device. With no valid row, every write is row 0's
    # unchanged value.
    # (index_select with a 1-element index, never x[t] with a 0-d tensor: that syncs to read t.)
    first = torch.argmax(valid.to(torch.int32)).view(1)
    target = torch.where(valid, rows, rows.index_select(0, first))
    keep = valid.view(-1, 1, 1)
    for pool, new in ((C, C1), (n, n1), (m, m1)):
        mask = valid.view(-1, *([1] * (new.ndim - 1)))
        new = torch.where(mask, new, pool[rows])
        pool.index_copy_(0, target, torch.where(mask, new, new.index_select(0, first)))
    return h * keep.to(h.dtype)
