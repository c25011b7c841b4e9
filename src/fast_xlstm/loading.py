"""Resolves what the user names as "the model" (a checkpoint directory or a preset) into a model and
a tokenizer, and the device/dtype defaults every entry point shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .config import PRESETS, get_preset
from .model import XLSTMForCausalLM
from .model.weights import parse_dtype
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_PRESET = "xlstm-tiny"


def default_model_dir() -> Path:
    """The bundled default model: the 7B block design at 13.4M parameters, trained on Shakespeare
    (see its README.md and recipes/default_model/)."""
    return Path(str(resources.files("fast_xlstm") / "assets" / "default"))


def tiny_tokenizer_dir() -> Path:
    """The byte-level BPE tokenizer (1024 tokens) shipped for the tiny demo and test models."""
    return Path(str(resources.files("fast_xlstm") / "assets" / "tiny"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 weights on GPUs (the speed runs' choice), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class LoadedModel:
    model: XLSTMForCausalLM
    tokenizer: Tokenizer
    source: str  # what was loaded, in words (for the user)
    random_weights: bool


def load(model: str | Path | None = None, *, device: str | None = None, dtype: torch.dtype | str | None = None,
         fuse: bool = False, seed: int = 0) -> LoadedModel:
    """Loads a checkpoint directory (hub or `xlstm` layout, with tokenizer.json), or builds a preset
    with random weights. None means the bundled default model (the tiny random preset if a build
    lacks it)."""
    device = device or default_device()
    dt = parse_dtype(dtype) or default_dtype(device)
    bundled = model is None and (default_model_dir() / "config.json").exists()
    name = str(default_model_dir()) if bundled else DEFAULT_PRESET if model is None else str(model)
    path = Path(name)
    if path.is_dir():
        lm = XLSTMForCausalLM.from_pretrained(path, dtype=dt, device=device, fuse=fuse)
        tok = Tokenizer.from_dir(path, bos_token_id=lm.config.bos_token_id or 0,
                                 add_bos=lm.config.force_bos_token_insert)
        what = "the bundled default model (13.4M parameters, trained on Shakespeare)" if bundled else f"checkpoint {path}"
        return LoadedModel(lm, tok, what, random_weights=False)
    if name in PRESETS:
        cfg = get_preset(name)
        tok = Tokenizer.from_dir(tiny_tokenizer_dir())
        if cfg.vocab_size < tok.vocab_size:
            raise ValueError(f"preset {name!r} has vocab_size {cfg.vocab_size} < the demo tokenizer's "
                             f"{tok.vocab_size}")
        tok.add_placeholder_tokens(cfg.vocab_size)  # every id the model can sample streams text
        lm = XLSTMForCausalLM.from_config(cfg, dtype=dt, device=device, seed=seed, init="random")
        if fuse:
            lm.fuse_projections()
        return LoadedModel(lm, tok, f"preset {name} with random weights", random_weights=True)
    raise ValueError(f"--model {name!r} is neither a checkpoint directory nor a preset "
                     f"({', '.join(PRESETS)})")
