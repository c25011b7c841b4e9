"""Rank-0 metrics: one JSON line per logged step (file), a short line on stdout, tensorboard if asked;
and the throughput arithmetic (tokens/s, MFU)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak per device (no sparsity), by substring of the CUDA device name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    """Known peak for the device, or None (CPU, unknown GPU): then MFU is not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(num_params: int, tokens_per_s_per_device: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation with the usual 6 x parameters FLOPs per token (forward + backward)."""
    if not peak_flops:
        return None
    return 6 * num_params * tokens_per_s_per_device / peak_flops


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a no-op logger."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("log.tensorboard needs the `tensorboard` package: pip install 'fast-xlstm[train]'"
                                  ) from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any], *, echo: bool = True, write: Callable[[str], None] | None = None) -> None:
        """Appends `record` to metrics.jsonl; with `echo`, prints its short form through `write`
        (default: stdout; the loop passes tqdm.write so lines print above the progress bar)."""
        if not self.enabled:
            return
        # Strict JSON: a non-finite number is written as null (the message says what happened).
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}" if not k.startswith("val") else k, v, record["step"])
        if echo:
            (write or (lambda line: print(line, file=sys.stdout, flush=True)))(format_record(record))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}"]
    for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("grad_norm", ".3f"), ("lr", ".3e"),
                     ("tokens_per_s", ",.0f"), ("mfu", ".1%")):
        if r.get(key) is not None:
            parts.append(f"{key} {format(r[key], fmt)}")
    return " | ".join(parts)
