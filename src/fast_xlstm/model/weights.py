"""Checkpoint I/O: the only place that knows checkpoint file layouts and key names.

Layouts read:
- hub (`NX-AI/xLSTM-7b`, transformers): `config.json`, `model.safetensors` or sharded
  `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`; keys `backbone.embeddings.weight`, ...
- `xlstm` package (`xlstm_large`): `config.yaml`, `model.safetensors` or `model_{n}.safetensors`;
  key `embedding.weight` instead of `backbone.embeddings.weight`; single or fused projections
  (`qkv_opreact`, `ifgate_preact`, `proj_up_gate_z`).
Loading streams one tensor at a time into a meta-device model, so a 7B checkpoint never exists twice.
Only safetensors are read: never pickles.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import XLSTMConfig

logger = logging.getLogger(__name__)

HUB_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float": torch.float32}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """'bfloat16'/'bf16'/torch.bfloat16 -> torch.bfloat16; None and 'auto' -> None (keep)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


# ---- locating files ------------------------------------------------------------------------------
def checkpoint_files(path: Path) -> tuple[str, list[Path]]:
    """Returns (layout, safetensors files) for a checkpoint directory; layout is "hub" or "xlstm"."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if (path / "config.json").exists():
        layout = "hub"
    elif (path / "config.yaml").exists():
        layout = "xlstm"
    else:
        raise FileNotFoundError(f"{path}: no config.json (hub layout) or config.yaml (xlstm layout)")
    index = path / HUB_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        files = sorted(path.glob("model_*.safetensors"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
        files = files or sorted(path.glob("model-*-of-*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickled weights are never loaded; convert to safetensors)" if pickles else ""
        raise FileNotFoundError(f"{path}: no model*.safetensors weights{hint}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{path}: weight file(s) named in {HUB_INDEX} are missing: {', '.join(missing)}")
    return layout, files


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (key, tensor) one at a time from safetensors files (memory-mapped reads)."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    yield key, handle.get_tensor(key)
        except SafetensorError as exc:
            raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc
        except OSError as exc:
            raise ValueError(f"{file}: cannot read safetensors file: {exc}") from exc


# ---- key mapping ---------------------------------------------------------------------------------
def _fused_splits(config: XLSTMConfig) -> dict[str, tuple[tuple[str, ...], list[int]]]:
    """Fused module name -> (the single modules its rows belong to, their row counts), in order."""
    qk, v, nh, ffn = config.qk_dim, config.v_dim, config.num_heads, config.ffn_dim
    return {
        "mlstm_layer.qkv_opreact": (("mlstm_layer.q", "mlstm_layer.k", "mlstm_layer.v", "mlstm_layer.ogate_preact"),
                                    [qk, qk, v, v]),
        "mlstm_layer.ifgate_preact": (("mlstm_layer.igate_preact", "mlstm_layer.fgate_preact"), [nh, nh]),
        "ffn.proj_up_gate_z": (("ffn.proj_up_gate", "ffn.proj_up"), [ffn, ffn]),
    }


def canonical_tensors(items: Iterator[tuple[str, torch.Tensor]], config: XLSTMConfig
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Maps any layout's keys to ours (= hub single-weight keys), splitting fused projections."""
    splits = _fused_splits(config)
    for key, t in items:
        if key == "embedding.weight":
            yield "backbone.embeddings.weight", t
            continue
        module, _, kind = key.rpartition(".")
        fused = next((f for f in splits if module.endswith("." + f)), None)
        if fused is None:
            yield key, t
            continue
        base = module[: -len(fused)]
        names, rows = splits[fused]
        _expect_rows(key, t, sum(rows))
        for name, part in zip(names, t.split(rows, 0)):
            yield f"{base}{name}.{kind}", part


def _expect_rows(key: str, t: torch.Tensor, rows: int) -> None:
    if t.ndim == 0 or t.shape[0] != rows:
        raise ValueError(f"checkpoint tensor {key}: expected {rows} rows, got shape {tuple(t.shape)}")


# ---- load ----------------------------------------------------------------------------------------
def load_model(cls: type, path: str | Path, *, dtype: torch.dtype | str | None, device: str | torch.device
               ) -> nn.Module:
    """Builds `cls(config)` on the meta device and streams the checkpoint's tensors into it."""
    path = Path(path)
    layout, files = checkpoint_files(path)
    config = XLSTMConfig.from_file(path / ("config.json" if layout == "hub" else "config.yaml"))
    target_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = cls(config)
    expected = dict(model.named_parameters(remove_duplicate=False))
    gate_names = {n for n in expected if ".igate_preact." in n or ".fgate_preact." in n}
    loaded: set[str] = set()
    unexpected: list[str] = []
    device = torch.device(device)
    for key, tensor in canonical_tensors(iter_checkpoint_tensors(files), config):
        if key not in expected:
            unexpected.append(key)
            continue
        if key in loaded:
            raise ValueError(f"{path}: tensor {key} appears twice in the checkpoint")
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(want.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: tensor {key} has non-float dtype {tensor.dtype}")
        t_dtype = torch.float32 if key in gate_names else (target_dtype or tensor.dtype)
        _set_parameter(model, key, tensor.to(device=device, dtype=t_dtype))
        loaded.add(key)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) in checkpoint: {', '.join(sorted(unexpected)[:8])}"
                         + (" ..." if len(unexpected) > 8 else ""))
    if config.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    return model


def _set_parameter(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, name, nn.Parameter(value))


# ---- save ----------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def single_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-layout (single-weight) tensors of a model, unfusing fused projections; contiguous copies."""
    config: XLSTMConfig = model.config
    sd = {k: t.detach() for k, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = dict(canonical_tensors(iter(sd.items()), config))
    return {k: t.contiguous() for k, t in out.items()}


def save_model(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB", layout: str = "hub"
               ) -> Path:
    """Writes the model. "hub": config.json + model-0000k-of-0000n.safetensors + index (or a single
    model.safetensors when it fits one shard). "xlstm": config.yaml + model.safetensors/model_{n}."""
    if layout not in ("hub", "xlstm"):
        raise ValueError(f"layout must be 'hub' or 'xlstm', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config: XLSTMConfig = model.config
    tensors = single_state_dict(model)
    if layout == "xlstm":
        tensors["embedding.weight"] = tensors.pop("backbone.embeddings.weight")
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + [path / HUB_INDEX]:
        old.unlink(missing_ok=True)  # never leave shards of an earlier save beside the new ones
    meta = {"format": "pt"}
    if layout == "hub":
        config.save(path)
        if len(shards) == 1:
            save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for n, shard in enumerate(shards, 1):
                name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(path / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (path / HUB_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    else:
        config.save(path, yaml_layout=True)
        if len(shards) == 1:
            save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
        else:
            for n, shard in enumerate(shards):
                save_file(shard, str(path / f"model_{n}.safetensors"), metadata=meta)
    return path
