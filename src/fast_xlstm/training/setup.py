"""Turning a TrainConfig into the objects a run needs: model config, sharded model, data loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..config import XLSTMConfig, get_preset
from ..model import XLSTMForCausalLM
from .config import TrainConfig
from .corpus import TokenCorpus, resolve_split
from .data import PackedLoader
from .parallelize import DistEnv, build_model, compute_dtype, init_model_, load_hub_weights_

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def model_config(cfg: TrainConfig) -> XLSTMConfig:
    """The architecture: the fine-tuning checkpoint's, else a config file's or a preset's, plus overrides."""
    m = cfg.model
    if m.init_from:
        if m.overrides:
            raise ValueError("model.overrides cannot change the architecture of model.init_from's checkpoint")
        return XLSTMConfig.from_file(m.init_from)
    base = XLSTMConfig.from_file(m.config) if m.config else get_preset(m.preset)
    try:
        return base.replace(**m.overrides)
    except TypeError as exc:
        raise ValueError(f"model.overrides: {exc}") from exc


def make_model(cfg: TrainConfig, config: XLSTMConfig, env: DistEnv) -> XLSTMForCausalLM:
    """Meta-device build, FSDP2 sharding, then 7B-recipe init or the fine-tuning checkpoint's weights."""
    p = cfg.parallel
    model = build_model(config, env, dtype=compute_dtype(env, p.dtype), activation_checkpointing=p.activation_checkpointing,
                        compile=p.compile, reshard_after_forward=p.reshard_after_forward,
                        reduce_dtype=getattr(torch, p.reduce_dtype))
    if cfg.model.init_from:
        load_hub_weights_(model, cfg.model.init_from)
    else:
        init_model_(model, recipe=cfg.model.init, seed=cfg.model.seed)
    return model.train()


def make_loaders(cfg: TrainConfig, env: DistEnv, vocab_size: int) -> tuple[PackedLoader, PackedLoader | None]:
    """The training loader (shuffled) and, if a validation split exists, the validation one (in order)."""
    d = cfg.data
    train = TokenCorpus(resolve_split(d.path, "train"))
    val_dir = Path(d.val_path) if d.val_path else (Path(d.path) / "val" if (Path(d.path) / "val").is_dir() else None)
    val = TokenCorpus(resolve_split(val_dir, "val")) if val_dir else None
    for corpus in (train, val):
        if corpus is not None and corpus.vocab_size > vocab_size:
            raise ValueError(f"{corpus.dir}: data was tokenized with a vocabulary of {corpus.vocab_size} ids but the "
                             f"model has vocab_size {vocab_size}")
    kw = dict(seq_len=d.seq_len, micro_batch_size=cfg.train.micro_batch_size, rank=env.rank,
              world_size=env.world_size)
    train_loader = PackedLoader(train, seed=d.seed, shuffle=d.shuffle, **kw)
    val_loader = PackedLoader(val, seed=0, shuffle=False, **kw) if val is not None else None
    return train_loader, val_loader


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    t = cfg.train
    per_pass = t.micro_batch_size * world_size
    if t.batch_size % per_pass:
        raise ValueError(f"train.batch_size {t.batch_size} is not a multiple of micro_batch_size x world size "
                         f"= {t.micro_batch_size} x {world_size}")
    return t.batch_size // per_pass


def find_tokenizer(cfg: TrainConfig, loader: PackedLoader) -> Path | None:
    """The tokenizer that goes with the run: the fine-tuning checkpoint's, else the prepared data's."""
    if cfg.model.init_from and (Path(cfg.model.init_from) / "tokenizer.json").is_file():
        return Path(cfg.model.init_from)
    return loader.corpus.tokenizer_dir


def copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
