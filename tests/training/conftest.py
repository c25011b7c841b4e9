"""Fixtures for the training tests: prepared tiny data and one in-process reference run (the golden
config), shared by the golden, multi-process, resume and export tests."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from modelutil import random_ids
from trainutil import golden_config, prepare_tiny_data, step_records, threads, write_txt_corpus

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # never the network, even by accident


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The synthetic corpus tokenized by prepare-data (train/ and val/ splits, tokenizer/)."""
    root = tmp_path_factory.mktemp("tiny_data")
    corpus = write_txt_corpus(root / "corpus.txt")
    prepare_tiny_data(root / "prepared", [corpus])
    return root / "prepared"


@pytest.fixture(scope="session")
def reference_run(tiny_data, tmp_path_factory) -> SimpleNamespace:
    """The golden config trained in this process (a world of one); keeps the trained model's logits
    on a probe batch, taken before the process group goes away."""
    from fast_xlstm.training.config import TrainConfig
    from fast_xlstm.training.parallelize import destroy_distributed, init_distributed
    from fast_xlstm.training.train import Trainer

    run_dir = tmp_path_factory.mktemp("reference")
    cfg = golden_config(tiny_data, run_dir)
    probe = random_ids((2, 40), seed=7)
    with threads():
        env = init_distributed("cpu")
        try:
            trainer = Trainer(TrainConfig.from_dict(cfg), env)
            assert trainer.fit() == 0
            with torch.no_grad():
                logits = trainer.model(probe)[0].clone()
        finally:
            destroy_distributed(env)
    return SimpleNamespace(run_dir=run_dir, config=cfg, records=step_records(run_dir), probe=probe, logits=logits)
