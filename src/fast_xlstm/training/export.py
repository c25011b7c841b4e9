"""Training checkpoint (DCP) -> hub-layout model directory that `from_pretrained` and transformers load."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from ..config import XLSTMConfig
from ..model import XLSTMForCausalLM
from ..model.weights import parse_dtype, save_model
from .checkpoint import load_model_weights, resolve_checkpoint
from .setup import copy_tokenizer

logger = logging.getLogger(__name__)


def export_checkpoint(ckpt: str | Path, dst: str | Path, *, dtype: str | torch.dtype | None = None,
                      tokenizer: str | Path | None = None, layout: str = "hub", max_shard_size: str = "5GB",
                      overwrite: bool = False) -> Path:
    """Reassembles the full model from a (sharded) checkpoint in one process and writes it with
    `save_model` (config.json, safetensors shards, index), plus the run's tokenizer files.

    ckpt: a `step-*` checkpoint dir or a checkpoint root (the newest is used).
    tokenizer: dir with tokenizer.json; default: the `tokenizer/` the run copied beside its checkpoints.
    """
    path = resolve_checkpoint(ckpt)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ValueError(f"{dst} exists and is not empty (pass --overwrite to write into it)")
    config = XLSTMConfig.from_file(path / "config.json")
    with torch.device("meta"):
        model = XLSTMForCausalLM(config)
    model.to_empty(device="cpu")
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended
        warnings.simplefilter("ignore")
        load_model_weights(path, model)
    target = parse_dtype(dtype)
    if target is not None:
        model.cast(target)  # gate projections stay fp32
    save_model(model, dst, max_shard_size=max_shard_size, layout=layout)
    tok_dir = Path(tokenizer) if tokenizer else path.parent / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        copy_tokenizer(tok_dir, dst)
    elif tokenizer:
        raise FileNotFoundError(f"{tok_dir}: no tokenizer.json")
    else:
        logger.warning("no tokenizer found beside %s; pass --tokenizer to add one", path)
    return dst
