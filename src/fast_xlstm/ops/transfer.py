"""Host-to-device copies that do not wait for the device."""

from __future__ import annotations

import torch


def device_ints(values: list[int], device: torch.device | str) -> torch.Tensor:
    """int64 [len(values)] on `device`, copied without waiting for the device's queue.

    A plain `torch.tensor(..., device=cuda)` is a blocking copy: the host waits until the stream has
    drained, and the GPU idles while the host refills it. A non-blocking copy from pageable memory
    goes through a driver staging buffer, which CUDA allows to block the host; from pinned memory
    the copy is queued like a kernel (PyTorch's pinned-memory cache keeps the buffer until the copy
    has run)."""
    host = torch.tensor(values, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def copy_to_device(dst: torch.Tensor, values: torch.Tensor) -> None:
    """dst.copy_(values) for a small host tensor, queued without waiting for the device's queue (the
    values staged in pinned memory, as in `device_ints`): a step launched while the previous one
    still runs must not drain the device just to load its inputs."""
    if dst.device.type == "cuda":
        values = values.pin_memory()
    dst.copy_(values, non_blocking=True)
