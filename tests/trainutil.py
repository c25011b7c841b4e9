"""Helpers shared by the training tests and tests/training/make_golden.py: a synthetic corpus, the
tiny golden-run config, running training in this process or as subprocesses, reading metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from fast_xlstm.loading import tiny_tokenizer_dir

GOLDEN = Path(__file__).parent / "training" / "golden" / "tiny_losses.json"

# A small grammar: enough structure that the loss falls fast, so a broken update shows.
_SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the red bird", "a small child"]
_VERBS = ["sees", "likes", "finds", "draws", "follows", "paints"]
_OBJECTS = ["the river", "a house", "the blue tree", "an apple", "the quiet hill", "a boat"]


def corpus_texts(n: int = 240, seed: int = 0) -> list[str]:
    """n short documents; Python's Mersenne Twister gives the same text on every platform."""
    r = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)}." for _ in range(r.randint(1, 8))]
        docs.append(" ".join(sentences).capitalize())
    return docs


def write_txt_corpus(path: Path, n: int = 240, seed: int = 0) -> Path:
    path.write_text("\n".join(corpus_texts(n, seed)) + "\n", encoding="utf-8")
    return path


def prepare_tiny_data(out: Path, inputs: list[Path], **kw: Any) -> dict:
    from fast_xlstm.training.prepare import PrepareOptions, prepare_data

    opts = dict(tokenizer=str(tiny_tokenizer_dir()), output=str(out), num_workers=1, progress=False,
                txt_split="line", val_fraction=0.1)
    opts.update(kw)
    return prepare_data(PrepareOptions(inputs=[str(p) for p in inputs], **opts))


def golden_config(data_dir: Path, run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """The tiny golden run: 2 blocks x d=128, rows of 64 tokens, 4 rows per step, 10 steps."""
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {"preset": "xlstm-tiny", "init": "7b", "seed": 0},
        "data": {"path": str(data_dir), "seq_len": 64, "seed": 0},
        "train": {"steps": 10, "batch_size": 4, "micro_batch_size": 4, "eval_every": 5, "eval_rows": 4},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "exp", "warmup_steps": 3, "cooldown_steps": 3},
        "parallel": {"device": "cpu", "cpu_threads": 1},
        "checkpoint": {"every": 3, "keep": 10},
        "log": {"every": 1, "progress": False},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """The last logged record of each step (a resumed run logs again the steps it redoes)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


class threads:
    """Restores torch's thread count after an in-process run set it (parallel.cpu_threads)."""

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.n)


def run_in_process(cfg: dict[str, Any]) -> int:
    from fast_xlstm.training.config import TrainConfig
    from fast_xlstm.training.train import run

    with threads():
        return run(TrainConfig.from_dict(cfg))


def train_command(config: Path, *overrides: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "fast_xlstm.training.train", "--config", str(config), *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node",
            str(nproc), "-m", "fast_xlstm.training.train", "--config", str(config), *overrides]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}


def run_subprocess(cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())
