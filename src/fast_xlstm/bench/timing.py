"""Timing, memory and roofline helpers shared by the benchmark stacks."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall seconds of `fn()` including a final device sync (for host-visible latencies)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    """Frees what earlier measurements left behind, then restarts the peak counter."""
    if device.type == "cuda":
        # cuBLAS keeps a workspace per (handle, stream) in torch's allocator; streams of earlier
        # stacks (graph warm-up and capture) would otherwise count toward the next peak.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on the device since `reset_peak` (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matrix product per token (all but the embedding table)."""
    emb = model.backbone.embeddings.weight if hasattr(model, "backbone") else model.embedding.weight
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p is not emb)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
