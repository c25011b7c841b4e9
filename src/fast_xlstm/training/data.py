"""Packing documents into fixed-length rows: deterministic, resumable, sharded across ranks.

Per epoch the documents are put in a seeded random order (or kept in order) and concatenated into
one stream; every document begins with id 0, which therefore also ends the document before it
(the 7B data's end-of-document token). Row g of the epoch is stream[g*S : g*S + S + 1]: inputs are
its first S tokens, targets its last S. A row starts from the empty state, and so does every
document that starts inside it (`doc_starts`): no state crosses a document boundary.

The position is one number, the next global row, so a run resumes exactly where it stopped, and
even with another number of ranks. Global row g of an optimizer step is read by exactly one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.xlstm import IGNORE_INDEX  # targets that carry no loss (prompt tokens of chat data)
from .corpus import TokenCorpus

__all__ = ["IGNORE_INDEX", "Batch", "PackedLoader"]


@dataclass
class Batch:
    """Rows of one micro-batch.

    input_ids:  int64 [B, S]
    labels:     int64 [B, S]; labels[:, t] is the target after input t, IGNORE_INDEX = no loss
    doc_starts: bool [B, S]; True where the state must be empty: position 0 and every document start
    rows:       the global row index of each row (for tests and debugging)
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_starts: torch.Tensor
    rows: list[int]

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class PackedLoader:
    """Rows of `seq_len` tokens from a TokenCorpus, `micro_batch_size` rows per rank per micro-batch.

    One optimizer step reads `micro_batch_size * world_size * grad_accum` consecutive global rows;
    inside the step, micro-batch m of rank r holds rows m*W*B + r*B .. +B (W ranks, B rows each).
    """

    def __init__(self, corpus: TokenCorpus, *, seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.corpus, self.seq_len, self.micro_batch_size = corpus, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.rows_per_epoch = (corpus.num_tokens - 1) // seq_len
        if self.rows_per_epoch < 1:
            raise ValueError(f"{corpus.dir}: {corpus.num_tokens} tokens do not fill one row of {seq_len + 1}")
        self.next_row = 0
        self._epoch = -1
        self._order = self._ends = np.zeros(0, np.int64)

    # ---- position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"next_row": self.next_row, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "num_documents": self.corpus.num_documents, "num_tokens": self.corpus.num_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        now = self.state_dict()
        for key in ("seq_len", "seed", "shuffle", "num_documents", "num_tokens"):
            if state.get(key) != now[key]:
                raise ValueError(f"cannot resume the data position: data {key} was {state.get(key)} when the "
                                 f"checkpoint was written and is {now[key]} now")
        self.next_row = int(state["next_row"])

    # ---- rows ----------------------------------------------------------------------------------
    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n = self.corpus.num_documents
        # PCG64 from (seed, epoch): the same order on every platform and rank.
        self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                       else np.arange(n, dtype=np.int64))
        self._ends = np.cumsum(self.corpus.doc_lengths[self._order])  # stream end of each document
        self._epoch = epoch

    def row(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global row g -> (inputs [S], labels [S], doc_starts [S])."""
        self._set_epoch(g // self.rows_per_epoch)
        S = self.seq_len
        a = (g % self.rows_per_epoch) * S  # stream position of the row's first token
        tokens = np.empty(S + 1, np.int64)
        mask = np.ones(S + 1, np.bool_)
        starts = np.zeros(S, np.bool_)
        starts[0] = True
        k = int(np.searchsorted(self._ends, a, side="right"))  # document holding position a
        filled = 0
        while filled < S + 1:
            doc_start = int(self._ends[k - 1]) if k else 0
            toks, dmask = self.corpus.document(int(self._order[k]))
            lo = a + filled - doc_start  # offset inside the document
            take = min(len(toks) - lo, S + 1 - filled)
            tokens[filled:filled + take] = toks[lo:lo + take]
            if dmask is not None:
                mask[filled:filled + take] = dmask[lo:lo + take] != 0
            if lo == 0 and filled < S:
                starts[filled] = True
            filled += take
            k += 1
        labels = np.where(mask[1:], tokens[1:], IGNORE_INDEX)
        return tokens[:S], labels, starts

    def _batch(self, rows: list[int]) -> Batch:
        parts = [self.row(g) for g in rows]
        ids, labels, starts = (torch.from_numpy(np.stack([p[j] for p in parts])) for j in range(3))
        return Batch(ids, labels, starts, rows)

    def next_step(self, grad_accum: int) -> list[Batch]:
        """This rank's `grad_accum` micro-batches of the next optimizer step; advances the position."""
        B, W = self.micro_batch_size, self.world_size
        base = self.next_row
        out = [self._batch([base + m * W * B + self.rank * B + j for j in range(B)]) for m in range(grad_accum)]
        self.next_row = base + grad_accum * W * B
        return out

    def fixed_rows(self, count: int) -> list[Batch]:
        """The first rows (for evaluation), this rank's equal share (every rank must run the same
        number of forwards under FSDP), in micro-batches."""
        n = max(1, count // self.world_size)
        mine = [self.rank * n + j for j in range(n)]
        B = self.micro_batch_size
        return [self._batch(mine[i:i + B]) for i in range(0, len(mine), B)]
