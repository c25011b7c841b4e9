"""prepare-data: the output bytes do not depend on the worker count; documents keep their boundaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from fast_xlstm.loading import tiny_tokenizer_dir
from fast_xlstm.tokenizer import Tokenizer
from fast_xlstm.training.corpus import TokenCorpus

from trainutil import corpus_texts, prepare_tiny_data, write_txt_corpus


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_output_for_any_worker_count(tmp_path: Path, inputs: list[Path], **kw) -> Path:
    outs = []
    for workers, chunk in ((1, 7), (2, 3), (2, 64)):
        out = tmp_path / f"out-{workers}-{chunk}"
        prepare_tiny_data(out, inputs, num_workers=workers, chunk_docs=chunk, shard_tokens=900, **kw)
        outs.append(out)
    first = _files(outs[0])
    assert len([n for n in first if n.startswith("train/tokens-")]) > 1  # several shards
    for out in outs[1:]:
        assert _files(out) == first
    return outs[0]


def test_text_files_are_deterministic_across_worker_counts(tmp_path):
    corpus = write_txt_corpus(tmp_path / "a.txt", n=120)
    out = _same_output_for_any_worker_count(tmp_path, [corpus])
    train, val = TokenCorpus(out / "train"), TokenCorpus(out / "val")
    assert train.num_documents + val.num_documents == 120 and val.num_documents > 0
    tok = Tokenizer.from_dir(out / "tokenizer")
    texts = set(corpus_texts(120))
    for d in range(train.num_documents):
        ids, mask = train.document(d)
        assert ids[0] == 0 and 0 not in ids[1:] and mask is None  # BOS first, boundaries kept
        assert tok.decode(ids[1:]) in texts
    assert train.index["dtype"] == "uint16"


def test_jsonl_and_parquet_inputs(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = corpus_texts(60, seed=5)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[:30])))
    datasets.Dataset.from_dict({"body": texts[30:]}).to_parquet(str(tmp_path / "b.parquet"))
    out = _same_output_for_any_worker_count(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.parquet"],
                                            text_field="body", val_fraction=0.0)
    corpus = TokenCorpus(out / "train")
    tok = Tokenizer.from_dir(tiny_tokenizer_dir())
    assert [tok.decode(corpus.document(d)[0][1:]) for d in range(corpus.num_documents)] == texts  # input order


def test_missing_datasets_package_gives_an_actionable_error(tmp_path, monkeypatch, capsys):
    from fast_xlstm.cli import main

    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    rc = main(["prepare-data", "--input", str(tmp_path / "a.jsonl"), "--tokenizer", str(tiny_tokenizer_dir()),
               "--output", str(tmp_path / "out"), "--num-workers", "1", "--no-progress"])
    assert rc == 2 and "pip install 'fast-xlstm[train]'" in capsys.readouterr().err


def test_bad_input_is_reported(tmp_path, capsys):
    from fast_xlstm.cli import main

    rc = main(["prepare-data", "--input", str(tmp_path / "missing.txt"), "--tokenizer", str(tiny_tokenizer_dir()),
               "--output", str(tmp_path / "out")])
    assert rc == 2 and "input file not found" in capsys.readouterr().err
    write_txt_corpus(tmp_path / "a.txt", n=5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    rc = main(["prepare-data", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tiny_tokenizer_dir()),
               "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = main(["prepare-data", "--input", str(tmp_path / "a.txt"), "--tokenizer", str(tiny_tokenizer_dir()),
               "--output", str(tmp_path / "out"), "--no-progress", "--overwrite"])
    assert rc == 2 and "refusing" in capsys.readouterr().err
    assert (tmp_path / "out" / "x").read_text() == "keep me"  # nothing was deleted
