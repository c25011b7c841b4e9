"""Training checkpoints with torch.distributed.checkpoint (DCP).

`<root>/step-00000100/` holds the DCP files (every rank writes its own shards: model, AdamW state),
plus, as DCP objects, the train state (step, data position, schedule step) and each rank's RNG
states, and beside them `config.json` (the model) and `meta.json` (the run). A checkpoint is
written to `step-N.tmp` and renamed when every rank has finished, so a run killed mid-save leaves
only complete checkpoints behind; resume picks the newest complete one.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .parallelize import DistEnv

PREFIX = "step-"
TRAIN_KEY = "train_state"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / ".metadata").is_file():
            out.append((int(p.name[len(PREFIX):]), p))
    return sorted(out)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a root holding `step-*` dirs (-> the newest)."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path}: no complete training checkpoint (step-*/.metadata) here")
    return found[-1][1]


def _rng_key(rank: int) -> str:
    return f"rng_rank{rank}"


def _rng_state() -> bytes:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


def _set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    train_state: dict[str, Any], env: DistEnv, *, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint dir."""
    root = Path(root)
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, TRAIN_KEY: json.dumps(train_state),
             _rng_key(env.rank): _rng_state()}
    dcp.save(state, checkpoint_id=tmp)
    if env.is_main:
        model.config.save(tmp)
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": env.world_size},
                                                  indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for _, old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
                    ) -> dict[str, Any]:
    """Collective: restores model, optimizer and (with the same world size) RNG; returns the train state.
    Works with any number of ranks: DCP reshards model and optimizer on load."""
    path = resolve_checkpoint(path)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd, TRAIN_KEY: ""}
    rng_key = _rng_key(env.rank)
    if rng_key in saved:
        state[rng_key] = b""
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if state.get(rng_key):
        _set_rng_state(state[rng_key])
    return json.loads(state[TRAIN_KEY])


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Only the model part of a checkpoint, into a plain (unsharded) model; works without a process
    group (DCP then runs in no-dist mode and reassembles full tensors)."""
    path = resolve_checkpoint(path)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
