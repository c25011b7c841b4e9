"""The on-disk token format written by `prepare-data` and read by the loader: the only code that knows it.

A split directory (e.g. `OUT/train/`) holds `index.json` and numbered shards:
```
tokens-00000.npy   uint16 (vocab <= 65536) or uint32 [T]   all documents of the shard, concatenated
offsets-00000.npy  int64 [D + 1]                          document d is tokens[offsets[d]:offsets[d+1]]
mask-00000.npy     uint8 [T] (chat data only)             1 = a token the loss is computed on
```
Every document starts with the BOS/EOD id 0 (as in the xLSTM 7B run). Shards are cut only between
documents. The bytes depend only on the input documents and settings, never on worker counts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "fast-xlstm-tokens"
VERSION = 1
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents in order and writes shards of about `shard_tokens` tokens."""

    def __init__(self, directory: Path, *, vocab_size: int, shard_tokens: int, with_mask: bool):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.shard_tokens, self.with_mask = vocab_size, shard_tokens, with_mask
        self.dtype = token_dtype(vocab_size)
        self.shards: list[dict[str, Any]] = []
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._pending = 0
        self.num_tokens = self.num_documents = 0

    def add(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        """One document: tokens [L] (starting with BOS 0), mask [L] of 0/1 when the writer has masks."""
        if len(tokens) == 0:
            raise ValueError("empty document (every document holds at least its BOS token)")
        if (mask is not None) != self.with_mask or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("loss mask missing, unexpected or of the wrong length")
        self._tokens.append(np.asarray(tokens, dtype=self.dtype))
        if mask is not None:
            self._masks.append(np.asarray(mask, dtype=np.uint8))
        self._lengths.append(len(tokens))
        self._pending += len(tokens)
        if self._pending >= self.shard_tokens:
            self._flush()

    @property
    def tokens_added(self) -> int:
        """Tokens added so far, written or pending."""
        return self.num_tokens + self._pending

    def _flush(self) -> None:
        if not self._lengths:
            return
        k = len(self.shards)
        names = {"tokens": f"tokens-{k:05d}.npy", "offsets": f"offsets-{k:05d}.npy",
                 "mask": f"mask-{k:05d}.npy" if self.with_mask else None}
        np.save(self.dir / names["tokens"], np.concatenate(self._tokens))
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(self._lengths, out=offsets[1:])
        np.save(self.dir / names["offsets"], offsets)
        if self.with_mask:
            np.save(self.dir / names["mask"], np.concatenate(self._masks))
        self.shards.append({**names, "num_tokens": int(offsets[-1]), "num_documents": len(self._lengths)})
        self.num_tokens += int(offsets[-1])
        self.num_documents += len(self._lengths)
        self._tokens, self._masks, self._lengths, self._pending = [], [], [], 0

    def close(self, **meta: Any) -> dict[str, Any]:
        """Writes the last shard and index.json (with `meta` added); returns the index."""
        self._flush()
        index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
                 "bos_token_id": 0, "num_tokens": self.num_tokens, "num_documents": self.num_documents,
                 "has_loss_mask": self.with_mask, "shards": self.shards, **meta}
        (self.dir / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return index


@dataclass
class _Shard:
    tokens: np.ndarray  # memory-mapped [T]
    offsets: np.ndarray  # [D + 1]
    mask: np.ndarray | None


class TokenCorpus:
    """Read-only view of a split directory: documents by global index, memory-mapped."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            hint = " (pass the `train` or `val` split, or the prepare-data output dir)" if self.dir.is_dir() else ""
            raise FileNotFoundError(f"{self.dir}: no {INDEX} of prepared token data{hint}")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{index_path}: not valid JSON: {exc}") from exc
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_path}: not {FORMAT} version {VERSION} data")
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.has_mask: bool = index["has_loss_mask"]
        self.shards: list[_Shard] = []
        for s in index["shards"]:
            try:
                tokens = np.load(self.dir / s["tokens"], mmap_mode="r")
                offsets = np.load(self.dir / s["offsets"])
                mask = np.load(self.dir / s["mask"], mmap_mode="r") if s.get("mask") else None
            except (OSError, ValueError) as exc:
                raise ValueError(f"{self.dir}: cannot read shard {s['tokens']}: {exc}") from exc
            if len(tokens) != offsets[-1] or len(offsets) != s["num_documents"] + 1:
                raise ValueError(f"{self.dir}: shard {s['tokens']} does not match its offsets (truncated?)")
            self.shards.append(_Shard(tokens, offsets, mask))
        counts = [len(s.offsets) - 1 for s in self.shards]
        self._first_doc = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [num_shards + 1]
        self.num_documents = int(self._first_doc[-1])
        self.num_tokens = int(sum(len(s.tokens) for s in self.shards))
        if self.num_documents == 0:
            raise ValueError(f"{self.dir}: the prepared data holds no documents")
        self.doc_lengths = np.concatenate([np.diff(s.offsets) for s in self.shards]).astype(np.int64)  # [D]

    def document(self, d: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [L] and loss mask [L] (None = every token counts) of document d."""
        k = int(np.searchsorted(self._first_doc, d, side="right")) - 1
        shard = self.shards[k]
        j = d - int(self._first_doc[k])
        a, b = int(shard.offsets[j]), int(shard.offsets[j + 1])
        return shard.tokens[a:b], (None if shard.mask is None else shard.mask[a:b])

    @property
    def tokenizer_dir(self) -> Path | None:
        """`tokenizer/` beside the split (written by prepare-data), if present."""
        cand = self.dir.parent / "tokenizer"
        return cand if (cand / "tokenizer.json").is_file() else None


def resolve_split(path: str | Path, split: str = "train") -> Path:
    """A prepare-data output dir -> its split dir; a split dir (holding index.json) stays as is."""
    path = Path(path)
    if (path / INDEX).is_file():
        return path
    if (path / split / INDEX).is_file():
        return path / split
    raise FileNotFoundError(f"{path}: neither prepared token data ({INDEX}) nor a dir with {split}/{INDEX}; "
                            f"run `fast-xlstm prepare-data` first")
