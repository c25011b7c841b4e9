"""`prepare-data`: raw documents -> token shards with document boundaries, in parallel, deterministic.

The main process reads documents in input order and hands chunks of them to a pool of tokenizer
workers; results come back in order (`imap`) and are written in order, so the output bytes do not
depend on the number of workers. A document goes to the validation split by a hash of its position
in the input, so the split is fixed too.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import Tokenizer
from .corpus import ShardWriter
from .sources import check_inputs, iter_records

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class PrepareOptions:
    inputs: list[str]
    tokenizer: str
    output: str
    chat: bool = False
    text_field: str = "text"
    messages_field: str = "messages"
    txt_split: str = "file"
    val_fraction: float = 0.0
    seed: int = 0
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 2**28
    chunk_docs: int = 256
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.num_workers < 1 or self.chunk_docs < 1:
            raise ValueError("num_workers and chunk_docs must be >= 1")


def tokenizer_dir(path: str | Path) -> Path:
    """A dir holding tokenizer.json, or the tokenizer.json file itself -> the dir."""
    path = Path(path)
    path = path.parent if path.is_file() else path
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return path


def is_validation(index: int, fraction: float, seed: int) -> bool:
    """Whether document `index` (its position in the input) belongs to the validation split.
    splitmix64 of (seed, index): platform-independent, and independent of chunking."""
    if fraction <= 0:
        return False
    x = (index + 0x9E3779B97F4A7C15 * (seed + 1)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return x / 2.0**64 < fraction


# ---- workers -------------------------------------------------------------------------------------
_TOKENIZER: Tokenizer | None = None


def _init_worker(tok_dir: str) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer.from_dir(tok_dir)


def _encode_chunk(job: tuple[int, list[Any], bool]) -> tuple[int, list[tuple[int, np.ndarray, np.ndarray | None]]]:
    """(first index, records, chat) -> (number of records, [(index, ids, mask or None)] of the non-empty ones)."""
    from .chat_format import encode_chat

    start, records, chat = job
    tok = _TOKENIZER
    assert tok is not None, "worker not initialised"
    out = []
    if chat:
        for n, messages in enumerate(records):
            try:
                ids, mask = encode_chat(tok, messages)
            except ValueError as exc:
                raise ValueError(f"chat record {start + n}: {exc}") from None
            out.append((start + n, np.asarray(ids, np.int64), np.asarray(mask, np.uint8)))
        return len(records), out
    for n, text in enumerate(records):
        if not isinstance(text, str):
            raise ValueError(f"record {start + n}: text must be a string, got {type(text).__name__}")
    keep = [(start + n, text) for n, text in enumerate(records) if text.strip()]
    encoded = tok.encode_batch([t for _, t in keep], add_bos=True)  # every document starts with id 0
    return len(records), [(i, np.asarray(ids, np.int64), None) for (i, _), ids in zip(keep, encoded)]


def _chunks(records: Iterator[Any], size: int, chat: bool) -> Iterator[tuple[int, list[Any], bool]]:
    buf: list[Any] = []
    start = 0
    for rec in records:
        buf.append(rec)
        if len(buf) == size:
            yield start, buf, chat
            start += size
            buf = []
    if buf:
        yield start, buf, chat


def _ordered_map(jobs: Iterator[Any], workers: int, tok_dir: str) -> Iterator[Any]:
    """`_encode_chunk` over jobs, results in job order, at most 2 x workers chunks in flight (so a
    huge input is never read into memory ahead of the writer)."""
    if workers == 1:
        _init_worker(tok_dir)
        yield from map(_encode_chunk, jobs)
        return
    # fork: workers start at once and inherit nothing they use but this module; spawn elsewhere.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # parallel across processes, not inside them
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_dir,)) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.apply_async(_encode_chunk, (job,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- driver --------------------------------------------------------------------------------------
def prepare_data(opts: PrepareOptions) -> dict[str, Any]:
    """Runs the whole pipeline; returns the summary also written to `<output>/prepare.json`."""
    files = check_inputs(opts.inputs)
    tok_dir = tokenizer_dir(opts.tokenizer)
    tok = Tokenizer.from_dir(tok_dir)
    if tok.bos_token_id != 0:
        raise ValueError("the tokenizer's BOS id must be 0 (the document separator of the xLSTM 7B data)")
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()):
        if not opts.overwrite:
            raise ValueError(f"{out} exists and is not empty (pass --overwrite to replace it)")
        if not (out / "prepare.json").is_file():  # never delete a directory we did not write
            raise ValueError(f"{out} is not an earlier prepare-data output; refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    writers = {"train": ShardWriter(out / "train", vocab_size=tok.vocab_size, shard_tokens=opts.shard_tokens,
                                    with_mask=opts.chat)}
    if opts.val_fraction > 0:
        writers["val"] = ShardWriter(out / "val", vocab_size=tok.vocab_size, shard_tokens=opts.shard_tokens,
                                     with_mask=opts.chat)
    records = iter_records(files, chat=opts.chat, text_field=opts.text_field, messages_field=opts.messages_field,
                           txt_split=opts.txt_split)
    jobs = _chunks(records, opts.chunk_docs, opts.chat)
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="tokenizing", disable=not opts.progress, file=sys.stderr, dynamic_ncols=True)
    seen = 0
    for count, results in _ordered_map(jobs, opts.num_workers, str(tok_dir)):
        for index, ids, mask in results:
            split = "val" if is_validation(index, opts.val_fraction, opts.seed) else "train"
            writers[split].add(ids, mask)
        seen += count
        bar.update(count)
        bar.set_postfix(tokens=sum(w.tokens_added for w in writers.values()), refresh=False)
    bar.close()
    meta = {"sources": [str(f) for f in files], "chat": opts.chat}
    splits = {name: w.close(**meta) for name, w in writers.items()}
    tok_out = out / "tokenizer"
    tok_out.mkdir()
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, tok_out / name)
    summary = {"records": seen, "settings": {k: v for k, v in asdict(opts).items()
                                             if k not in ("num_workers", "progress", "overwrite", "output",
                                                          "chunk_docs")},
               **{name: {"documents": s["num_documents"], "tokens": s["num_tokens"], "shards": len(s["shards"])}
                  for name, s in splits.items()}}
    (out / "prepare.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return summary
