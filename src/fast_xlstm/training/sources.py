"""Reading raw documents from local files, in a fixed order: .txt (plain Python), .jsonl/.json and
.parquet (through `datasets`, the `train` extra)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


def _load_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("reading .jsonl/.json/.parquet files needs the `datasets` package: "
                          "pip install 'fast-xlstm[train]'") from None
    return datasets


def check_inputs(files: list[str | Path]) -> list[Path]:
    """Existing files with a known suffix, in the order given (directories expand to sorted files)."""
    out: list[Path] = []
    known = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    for f in map(Path, files):
        if f.is_dir():
            out += sorted(p for p in f.rglob("*") if p.is_file() and p.suffix in known)
        elif not f.is_file():
            raise FileNotFoundError(f"input file not found: {f}")
        elif f.suffix not in known:
            raise ValueError(f"{f}: unknown input type {f.suffix!r}; use {', '.join(known)}")
        else:
            out.append(f)
    if not out:
        raise ValueError("no input files")
    return out


def _split_text(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text]
    if mode == "line":
        return text.splitlines()
    if mode == "blank":  # paragraphs separated by blank lines
        parts, cur = [], []
        for line in text.splitlines():
            if line.strip():
                cur.append(line)
            elif cur:
                parts.append("\n".join(cur))
                cur = []
        return parts + (["\n".join(cur)] if cur else [])
    raise ValueError(f"txt_split must be file, line or blank, got {mode!r}")


def iter_records(files: list[Path], *, chat: bool, text_field: str = "text", messages_field: str = "messages",
                 txt_split: str = "file") -> Iterator[Any]:
    """Yields each document: a str, or (chat) a list of {role, content} messages. The order is the
    file order, then the order inside each file, so the same inputs always give the same stream."""
    field = messages_field if chat else text_field
    for f in files:
        if f.suffix in TEXT_SUFFIXES:
            if chat:
                raise ValueError(f"{f}: chat data must be .jsonl/.parquet records with a {messages_field!r} field")
            yield from _split_text(f.read_text(encoding="utf-8", errors="replace"), txt_split)
            continue
        datasets = _load_datasets()
        builder = "json" if f.suffix in JSON_SUFFIXES else "parquet"
        # Streaming reads the file in order and writes no arrow cache.
        ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True)
        for n, record in enumerate(ds):
            if field not in record:
                raise ValueError(f"{f}: record {n} has no {field!r} field (fields: {', '.join(record)}); "
                                 f"choose one with --{'messages' if chat else 'text'}-field")
            yield record[field]
