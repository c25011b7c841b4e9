"""Packed prefill from tables that live on the device: the chunkwise forward with no host sync.

`mlstm_chunkwise_triton` plans its sequence and chunk tables on the host from `cu_seqlens`, and the
table sizes set the launch grids, so each new packing is new host work. For CUDA graphs the shapes
must be fixed instead: a `PackedPlan` reserves room for at most `max_seqs` sequences in `num_tokens`
positions and `max_chunks = num_tokens // L + max_seqs` chunk entries (sum of ceil(len/L) never
exceeds it). `plan_values` writes one packing into that room:
  - sequences past the real ones repeat the shortest real one (same rows, chunk slots and initial
    state), so they compute and store bit-identical values where it does: harmless duplicates,
    where a "skip" sequence would need a spare state row;
  - chunk entries past the real ones point at chunk index `_NOWHERE`, past every sequence's end, so
    every position of them is masked out.
Only the values change between replays; the kernels and their grids stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .._checks import MLSTMState
from ._common import SeqTables, aligned, aligned_sections, chunk_len, tables_from_aligned
from .chunkwise_fwd import inner_contiguous, mlstm_chunkwise_fwd

# A chunk index past any sequence (positions j * L + t >= seq_len: all masked). The kernels compute
# j * L + t in int32, so it must stay below 2^31 / 128 (the longest chunk); at 2^24 it wrapped to a
# negative position with 128-token chunks and the masks let the padding chunk read out of bounds.
_NOWHERE = 1 << 20


@dataclass(frozen=True)
class PackedLayout:
    """The fixed shape of a plan: `max_seqs` sequences packed into `num_tokens` positions."""

    max_seqs: int
    num_tokens: int
    chunk_size: int  # the model's chunk size; the kernel chunk length L follows from it and num_tokens

    @property
    def L(self) -> int:
        return chunk_len(self.chunk_size, self.num_tokens)

    @property
    def max_chunks(self) -> int:
        return self.num_tokens // self.L + self.max_seqs

    @property
    def size(self) -> int:
        """Length of the int64 table buffer: seq_base, seq_len, chunk_off [max_seqs], chunk_seq, chunk_j
        [max_chunks], each section padded to a multiple of 4 entries (`_common.aligned_sections`)."""
        return 3 * aligned(self.max_seqs) + 2 * aligned(self.max_chunks)


def plan_values(layout: PackedLayout, offsets: list[int]) -> list[int]:
    """The table buffer's values for sequences packed at `offsets` (cu_seqlens as ints, N + 1 of them).

    Raises ValueError when the packing does not fit the layout.
    """
    N = len(offsets) - 1
    if not 1 <= N <= layout.max_seqs:
        raise ValueError(f"a plan for at most {layout.max_seqs} sequences got {N}")
    if offsets[0] != 0 or offsets[-1] > layout.num_tokens or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets must rise strictly from 0 to at most {layout.num_tokens}, got {offsets}")
    L, M = layout.L, layout.max_chunks
    if offsets[-1] > _NOWHERE * L:
        raise ValueError(f"packed prefills hold at most {_NOWHERE * L} tokens with {L}-token chunks")
    lens = [offsets[r + 1] - offsets[r] for r in range(N)]
    ncs = [triton.cdiv(n, L) for n in lens]
    chunk_off = [sum(ncs[:r]) for r in range(N)]
    chunk_seq = [r for r in range(N) for _ in range(ncs[r])]
    chunk_j = [j for r in range(N) for j in range(ncs[r])]
    dup = _shortest(offsets)
    pad = layout.max_seqs - N
    base = offsets[:-1] + [offsets[dup]] * pad
    lens = lens + [lens[dup]] * pad
    chunk_off = chunk_off + [chunk_off[dup]] * pad
    free = M - len(chunk_seq)
    return aligned_sections([base, lens, chunk_off, chunk_seq + [0] * free, chunk_j + [_NOWHERE] * free])


def padded_rows(layout: PackedLayout, offsets: list[int], rows: list[int]) -> list[int]:
    """Per-sequence values (state rows, last positions ...) padded the way `plan_values` pads sequences."""
    return list(rows) + [rows[_shortest(offsets)]] * (layout.max_seqs - (len(offsets) - 1))


def _shortest(offsets: list[int]) -> int:
    """The sequence that padding sequences repeat: the shortest (the least repeated work)."""
    return min(range(len(offsets) - 1), key=lambda r: offsets[r + 1] - offsets[r])


@dataclass(frozen=True)
class PackedPlan:
    """Device tables for one layout (see the module docstring); built inside the graph from the buffer."""

    tables: SeqTables
    L: int

    @classmethod
    def from_buffer(cls, layout: PackedLayout, buf: torch.Tensor) -> "PackedPlan":
        """buf: int64 [layout.size] on the device (16-byte aligned), filled with `plan_values`. The int32
        views are made by one kernel here, so when this runs inside a captured graph, replays see new
        values."""
        return cls(tables_from_aligned(layout.max_seqs, layout.max_chunks, buf, None), layout.L)


def mlstm_chunkwise_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                            initial_state: MLSTMState, plan: PackedPlan, *, eps: float = 1e-6,
                            state_rows: torch.Tensor | None = None, final_to_pool: bool = False
                            ) -> tuple[torch.Tensor, MLSTMState | None]:
    """Inference forward of packed sequences described by `plan` (no autograd, no host sync).

    q, k [1, NH, T, DK]; v [1, NH, T, DV]; i, f [1, NH, T]. Views are read in place (no copies): q, k, v
    need only a contiguous last dim (e.g. the [1, NH, T, D] transpose of a [1, T, NH * D] projection),
    the gates any strides. initial_state (any float dtype): without `state_rows`, (C [N, NH, DK, DV],
    n [N, NH, DK], m [N, NH, 1]) with N = plan's max_seqs; with `state_rows` (int64 [N] on the device),
    a contiguous state pool (C [P, NH, DK, DV], n [P, NH, DK], m [P, NH, 1]) from which sequence r
    starts at row state_rows[r], read by the kernel (no gather); the pool is not modified unless
    `final_to_pool`, which writes each real sequence's final state back into its row (by the output
    kernel, after every initial state was read; padding sequences write nothing) and returns None for
    the final state. Positions outside the plan's sequences get unspecified h. Returns h [1, NH, T, DV]
    in q's dtype (token-major: h.transpose(1, 2) is contiguous) and the final state [N, ...] (fp32) or None.
    """
    dt = q.dtype
    q, k, v = (inner_contiguous(x.to(dt)) for x in (q, k, v))
    init = tuple(initial_state)
    # Inference only: the positions outside the plan's sequences (a bucket's tail) are never read.
    h, (Cf, nf, mf), _ = mlstm_chunkwise_fwd(q, k, v, i, f, init, plan.tables, plan.L, eps, state_rows=state_rows,
                                             zero_fill=False, final_to_pool=final_to_pool, token_major=True)
    return h, (None if final_to_pool else (Cf, nf, mf.unsqueeze(-1)))
