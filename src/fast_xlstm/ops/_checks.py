"""Shape and dtype checks shared by every mLSTM op (so each backend rejects bad input the same way)."""

from __future__ import annotations

import torch

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Per-layer recurrent state (C [B, NH, DK, DV], n [B, NH, DK], m [B, NH, 1])."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """State and gate math run in fp32, or fp64 when the inputs are fp64 (the oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_sequence_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                          f: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validates [B, NH, S, D] sequence inputs; returns (B, NH, S, DK, DV)."""
    if q.ndim != 4:
        raise ValueError(f"q must have shape [B, NH, S, DK], got {tuple(q.shape)}")
    B, NH, S, DK = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, NH, S):
        raise ValueError(f"v must have shape [{B}, {NH}, {S}, DV], got {tuple(v.shape)}")
    for name, g in (("i", i), ("f", f)):
        if g.shape != (B, NH, S):
            raise ValueError(f"{name} (gate pre-activation) must have shape [{B}, {NH}, {S}], got {tuple(g.shape)}")
    return B, NH, S, DK, v.shape[-1]


def check_state(state: MLSTMState, B: int, NH: int, DK: int, DV: int, what: str = "initial_state") -> None:
    """Validates a (C, n, m) state for B sequences."""
    if not (isinstance(state, (tuple, list)) and len(state) == 3):
        raise ValueError(f"{what} must be a tuple (C, n, m)")
    C, n, m = state
    if C.shape != (B, NH, DK, DV):
        raise ValueError(f"{what}: C must have shape [{B}, {NH}, {DK}, {DV}], got {tuple(C.shape)}")
    if n.shape != (B, NH, DK):
        raise ValueError(f"{what}: n must have shape [{B}, {NH}, {DK}], got {tuple(n.shape)}")
    if m.shape != (B, NH, 1):
        raise ValueError(f"{what}: m must have shape [{B}, {NH}, 1], got {tuple(m.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, B: int, S: int) -> list[int]:
    """Validates packed-sequence offsets [N + 1] (0 = first, S = last, non-decreasing); returns them as ints."""
    if B != 1:
        raise ValueError(f"packed (cu_seqlens) input must have batch size 1, got {B}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of N+1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    offs = [int(x) for x in cu_seqlens.tolist()]
    if offs[0] != 0 or offs[-1] != S or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the packed length {S}, got {offs}")
    return offs


def zero_state(B: int, NH: int, DK: int, DV: int, dtype: torch.dtype, device: torch.device) -> MLSTMState:
    """The empty state (C = 0, n = 0, m = 0) that every sequence starts from."""
    return (torch.zeros(B, NH, DK, DV, dtype=dtype, device=device),
            torch.zeros(B, NH, DK, dtype=dtype, device=device),
            torch.zeros(B, NH, 1, dtype=dtype, device=device))
