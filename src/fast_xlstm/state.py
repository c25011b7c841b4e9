"""The recurrent state as a value: helpers over the model's per-block (C, n, m) list.

A state for N sequences is `list[(C [N, NH, DK, DV], n [N, NH, DK], m [N, NH, 1])]`, one tuple per
block. Its size is fixed per sequence (134 MB in fp32 for the 7B), whatever the sequence length.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import XLSTMConfig
from .model import ModelState
from .ops.transfer import device_ints


def init_state(config: XLSTMConfig, batch_size: int, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> ModelState:
    """The empty state (all zeros, the state every document starts from) for `batch_size` sequences."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    nh, dk, dv = config.num_heads, config.qk_head_dim, config.v_head_dim
    return [(torch.zeros(batch_size, nh, dk, dv, dtype=dtype, device=device),
             torch.zeros(batch_size, nh, dk, dtype=dtype, device=device),
             torch.zeros(batch_size, nh, 1, dtype=dtype, device=device)) for _ in range(config.num_blocks)]


def state_batch_size(state: ModelState) -> int:
    return int(state[0][0].shape[0])


def state_nbytes(state: ModelState) -> int:
    """Bytes held by the state (all blocks, all sequences)."""
    return sum(t.numel() * t.element_size() for layer in state for t in layer)


def state_bytes_per_sequence(config: XLSTMConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sequence's state: constant in sequence length."""
    return config.state_numel_per_sequence() * torch.empty(0, dtype=dtype).element_size()


def select_state(state: ModelState, index: torch.Tensor | list[int]) -> ModelState:
    """Rows `index` of every tensor (a copy): keep, reorder or repeat sequences."""
    idx = torch.as_tensor(index, dtype=torch.long, device=state[0][0].device)
    return [tuple(t.index_select(0, idx) for t in layer) for layer in state]


def concat_states(states: list[ModelState]) -> ModelState:
    """Stacks the sequences of several states (same config) into one batch."""
    if not states:
        raise ValueError("concat_states needs at least one state")
    return [tuple(torch.cat([s[b][j] for s in states], 0) for j in range(3)) for b in range(len(states[0]))]


def clone_state(state: ModelState) -> ModelState:
    return [tuple(t.clone() for t in layer) for layer in state]


def cast_state(state: ModelState, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> ModelState:
    return [tuple(t.to(device=device, dtype=dtype) for t in layer) for layer in state]


def save_state(state: ModelState, path: str | Path) -> None:
    """Writes a state to a safetensors file (e.g. to resume a conversation later)."""
    tensors = {f"blocks.{b}.{name}": t.contiguous().cpu()
               for b, layer in enumerate(state) for name, t in zip("Cnm", layer)}
    save_file(tensors, str(path), metadata={"format": "fast_xlstm.state", "num_blocks": str(len(state))})


def load_state(path: str | Path, *, device: str | torch.device = "cpu") -> ModelState:
    """Reads a state written by `save_state`."""
    tensors = load_file(str(path), device=str(device))
    num_blocks = len({k.split(".")[1] for k in tensors})
    try:
        return [tuple(tensors[f"blocks.{b}.{name}"] for name in "Cnm") for b in range(num_blocks)]
    except KeyError as exc:
        raise ValueError(f"{path}: not a state file written by save_state (missing {exc})") from exc


class StatePool:
    """Preallocated states of `num_slots` sequences (the serving analogue of a KV cache).

    `layers` is a ModelState with `num_slots` rows that the model's `step_slots` and the prefill
    update in place; a request holds one row (slot) for its whole life. Admission is by slot, not
    by page: every sequence needs the same bytes whatever its length. Which slot is free is the
    scheduler's business (pure Python); this class only holds the tensors.

    The blocks' tensors are views of three stacked tensors (C [L, P, NH, DK, DV], n, m), so resetting,
    reading or writing slots is three kernels, not three per block: those run on the host's clock
    before every prefill (7B: 96 launches saved per admitted request).
    """

    def __init__(self, config: XLSTMConfig, num_slots: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        L, nh, dk, dv = config.num_blocks, config.num_heads, config.qk_head_dim, config.v_head_dim
        self.stacked = (torch.zeros(L, num_slots, nh, dk, dv, dtype=dtype, device=device),
                        torch.zeros(L, num_slots, nh, dk, dtype=dtype, device=device),
                        torch.zeros(L, num_slots, nh, 1, dtype=dtype, device=device))
        self.layers: ModelState = _unstack(self.stacked)

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.layers)

    def _index(self, slots: list[int] | torch.Tensor) -> torch.Tensor:
        # A list goes through pinned memory: a plain host-to-device copy would wait for the device's
        # queue, and a slot is set up while the previous step still runs.
        if isinstance(slots, torch.Tensor):
            return slots.to(device=self.stacked[0].device, dtype=torch.long)
        return device_ints(list(slots), self.stacked[0].device)

    def reset(self, slots: list[int] | torch.Tensor) -> None:
        """Sets rows `slots` to the empty state (where every document starts)."""
        idx = self._index(slots)
        for t in self.stacked:
            t.index_fill_(1, idx, 0)

    def read(self, slots: list[int] | torch.Tensor) -> ModelState:
        """A copy of the rows `slots` (e.g. to prefill from, snapshot or fork a sequence)."""
        idx = self._index(slots)
        return _unstack(tuple(t.index_select(1, idx) for t in self.stacked))

    def write(self, slots: list[int] | torch.Tensor, state: ModelState) -> None:
        """Copies `state` (len(slots) sequences) into the rows `slots`."""
        idx = self._index(slots)
        stacked = state.stacked if isinstance(state, StackedState) else None
        for j, pool_t in enumerate(self.stacked):
            parts = [layer[j] for layer in state]
            src = stacked[j] if stacked is not None else None
            if src is None and parts[0].device != pool_t.device:
                src = torch.stack(parts)  # from the host tier of a cache: stack there, move once
            if src is not None:  # one copy for all blocks (a snapshot from `read`, or stacked above)
                pool_t.index_copy_(1, idx, src.to(device=pool_t.device, dtype=pool_t.dtype, non_blocking=True))
                continue
            # Separate per-block tensors on the device (a prefill's new states): copied block by block,
            # since stacking them first would hold a second copy of the whole group's state.
            for pool_b, part in zip(pool_t, parts):
                pool_b.index_copy_(0, idx, part.to(pool_b.dtype))


class StackedState(list):
    """A ModelState whose blocks are views of three stacked [L, N, ...] tensors (`stacked`), as
    `StatePool.read` returns it: writing it back is one copy per tensor, found without looking at
    the blocks (a per-block check is ~200 tensor calls on the host for the 7B's 32 blocks, on the
    path to a restored request's first token). Treat it as
    read-only, like any snapshot: `stacked` must keep matching the blocks."""

    stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _unstack(stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> StackedState:
    """Per-block (C, n, m) views of stacked [L, N, ...] tensors."""
    C, n, m = stacked
    out = StackedState((C[b], n[b], m[b]) for b in range(C.shape[0]))
    out.stacked = stacked
    return out
