"""mLSTM cell ops: one dispatch point for every implementation.

The model calls `mlstm_chunkwise`, `mlstm_step`, `mlstm_step_slots_` and, for CUDA-graph prefill,
`mlstm_chunkwise_planned` (Triton only: `planned_prefill_supported` says when it is there).
Backends register here; "auto" picks the fastest registered backend that supports the tensors'
device (Triton on CUDA once registered, torch elsewhere). `FAST_XLSTM_BACKEND=torch|triton|auto`
forces a choice for the whole process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ._checks import MLSTMState, zero_state
from .chunkwise_torch import mlstm_chunkwise_torch
from .reference import mlstm_quadratic, mlstm_recurrent, mlstm_step_torch
from .step_slots_torch import mlstm_step_slots_torch_

if TYPE_CHECKING:  # importing triton is slow and optional
    from .triton import PackedPlan

__all__ = ["MLSTMState", "mlstm_chunkwise", "mlstm_step", "mlstm_recurrent", "mlstm_quadratic",
           "mlstm_chunkwise_torch", "mlstm_step_torch", "register_backend", "resolve_backend", "zero_state",
           "available_backends", "mlstm_step_slots_", "mlstm_step_slots_torch_", "mlstm_chunkwise_planned",
           "planned_prefill_supported", "triton_module", "gate_projection", "head_norm_gate",
           "head_norm_gate_supported", "linear", "row_kernel_supported", "swiglu", "row_linear_gates",
           "few_rows_kernel_supported", "FEW_ROWS_MAX"]


@dataclass(frozen=True)
class Backend:
    """A set of mLSTM implementations with the signatures of the torch ones."""

    name: str
    chunkwise: Callable[..., tuple[torch.Tensor, MLSTMState]]
    step: Callable[..., tuple[torch.Tensor, MLSTMState]]
    supports: Callable[[torch.Tensor], bool]
    priority: int = 0
    step_slots: Callable[..., torch.Tensor] | None = None  # in-place pool step; None = the torch twin


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", mlstm_chunkwise_torch, mlstm_step_torch, lambda t: True, priority=0,
                     step_slots=mlstm_step_slots_torch_),
}


log = logging.getLogger(__name__)
_TRITON_MODULE = None  # fast_xlstm.ops.triton once imported, False if that failed


def _triton():
    """Imports the Triton kernels on first use (importing triton is slow and needs a working install)."""
    global _TRITON_MODULE
    if _TRITON_MODULE is None:
        try:
            from . import triton as mod
            _TRITON_MODULE = mod
        except Exception as e:  # broken or CPU-only triton: torch stays the backend
            log.debug("Triton mLSTM backend unavailable, using torch: %r", e)
            _TRITON_MODULE = False
    return _TRITON_MODULE or None


def _triton_supports(x: torch.Tensor) -> bool:
    """CUDA tensors (CPU ones only under TRITON_INTERPRET=1, for tests) of dtype fp32/bf16/fp16."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return _triton() is not None


def register_backend(backend: Backend) -> None:
    """Adds (or replaces) a backend; higher priority wins under "auto" where it supports the device."""
    _BACKENDS[backend.name] = backend


try:
    if importlib.util.find_spec("triton") is not None:  # finds the package without importing it
        _BACKENDS["triton"] = Backend("triton", lambda *a, **kw: _triton().mlstm_chunkwise_triton(*a, **kw),
                                      lambda *a, **kw: _triton().mlstm_step_triton(*a, **kw), _triton_supports,
                                      priority=10, step_slots=lambda *a, **kw: _triton().mlstm_step_slots_(*a, **kw))
except Exception as e:  # pragma: no cover - a broken install must not break the torch path
    log.debug("not registering the Triton mLSTM backend: %r", e)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_backend(x: torch.Tensor, backend: str | None = None) -> Backend:
    """Chooses the backend for tensor `x`: explicit name, else $FAST_XLSTM_BACKEND, else "auto"."""
    name = backend or os.environ.get("FAST_XLSTM_BACKEND", "auto")
    if name == "auto":
        best = _BACKENDS["torch"]  # a plain loop: torch.compile traces this function
        for b in _BACKENDS.values():
            if b.priority > best.priority and b.supports(x):
                best = b
        return best
    if name not in _BACKENDS:
        raise ValueError(f"unknown mLSTM backend {name!r}; available: auto, {', '.join(available_backends())}")
    chosen = _BACKENDS[name]
    if not chosen.supports(x):
        raise ValueError(f"mLSTM backend {name!r} does not support tensors on {x.device}")
    return chosen


def mlstm_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                    initial_state: MLSTMState | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    chunk_size: int = 64, eps: float = 1e-6, backend: str | None = None
                    ) -> tuple[torch.Tensor, MLSTMState]:
    """Sequence (prefill/training) form. Shapes: see `chunkwise_torch.mlstm_chunkwise_torch`."""
    return resolve_backend(q, backend).chunkwise(q, k, v, i, f, initial_state, cu_seqlens=cu_seqlens,
                                                 chunk_size=chunk_size, eps=eps)


def mlstm_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
               state: MLSTMState | None = None, *, eps: float = 1e-6, backend: str | None = None
               ) -> tuple[torch.Tensor, MLSTMState]:
    """Single decode step. Shapes: see `reference.mlstm_step_torch`."""
    return resolve_backend(q, backend).step(q, k, v, i, f, state, eps=eps)


def mlstm_step_slots_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor | None,
                      C: torch.Tensor, n: torch.Tensor, m: torch.Tensor, slots: torch.Tensor, *, eps: float = 1e-6,
                      backend: str | None = None) -> torch.Tensor:
    """Decode step on state-pool rows `slots` (-1 = skip), updating the pool in place; returns h.
    The gates come as i, f [B, NH] or packed as i [B, 2NH] (input gate first) with f None.

    Shapes: see `step_slots_torch.mlstm_step_slots_torch_`.
    """
    impl = resolve_backend(q, backend).step_slots or mlstm_step_slots_torch_
    return impl(q, k, v, i, f, C, n, m, slots, eps=eps)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an op on these tensors (the inference-only kernels must not run)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gate_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fp32 gate projection x [..., K] -> [..., N] = x.float() @ weight.float().T + bias.float().

    For bf16 x where the Triton kernels run and no gradient is needed, one kernel reads x once
    (`triton.gate_projection`); elsewhere (CPU, other dtypes, training) it is the fp32 linear.
    """
    if not _needs_grad(x, weight, bias) and x.dtype == torch.bfloat16 and resolve_backend(x).name == "triton":
        return _triton().gate_projection_triton(x, weight, bias)
    return torch.nn.functional.linear(x.float(), weight.float(), bias.float())


def _inference_16bit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """16-bit x and a contiguous weight of its dtype, where the Triton kernels run, no gradient needed."""
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and weight.is_contiguous()
            and not _needs_grad(x, weight) and resolve_backend(x).name == "triton")


def row_kernel_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` (and its fused forms) of x by this weight goes to the one-row kernels: x holds
    one row (a batch-1 decode step), 16-bit like the contiguous weight, where the Triton kernels run
    and no gradient is needed. Under torch.compile the row test is on shapes only: dynamo specializes
    a batch of 1, so a dynamic-shape graph takes the torch path without a guard."""
    return x.numel() == x.shape[-1] and _inference_16bit(x, weight)


FEW_ROWS_MAX = 64
"""The most rows (a decode batch, or a short prefill's tokens) that `linear` sends to the few-row kernel."""


def few_rows_kernel_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` of x by this weight goes to the few-row kernel (`triton.few_rows_linear`): 2 to
    `FEW_ROWS_MAX` rows of 16-bit x, otherwise as `row_kernel_supported`. Under torch.compile with a
    dynamic row count this test is a guard: one compiled variant each side of it."""
    return 2 <= x.numel() // x.shape[-1] <= FEW_ROWS_MAX and _inference_16bit(x, weight)


def linear(x: torch.Tensor, lin: torch.nn.Linear, residual: torch.Tensor | None = None) -> torch.Tensor:
    """lin(x) (+ residual), x [..., K] -> [..., N] (residual broadcastable to it, added last). Where
    `row_kernel_supported`, the matrix-vector kernel (`triton.row_linear`: more weight bytes in flight
    than a GEMM at one row), with the residual add in its epilogue; for 2 to 64 rows where
    `few_rows_kernel_supported`, the few-row tensor-core kernel (`triton.few_rows_linear`), with the
    add in its epilogue when the residual has the output's shape and dtype; anything else calls the
    module, so its hooks (tensor or data parallel wrappers) still run."""
    if row_kernel_supported(x, lin.weight) and (residual is None or residual.numel() == lin.out_features):
        return _triton().row_linear_triton(x, lin.weight, lin.bias, residual)
    if few_rows_kernel_supported(x, lin.weight):
        out_shape = (*x.shape[:-1], lin.out_features)
        if residual is not None and residual.shape == out_shape and residual.dtype == x.dtype:
            return _triton().few_rows_linear_triton(x, lin.weight, lin.bias, residual)
        y = _triton().few_rows_linear_triton(x, lin.weight, lin.bias)
    else:
        y = lin(x)
    return y if residual is None else residual + y


def swiglu(z: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    """SiLU(gate) * up of a fused up projection lin ([2I, K]: gate rows, then up rows): z [..., K] ->
    [..., I]. Where `row_kernel_supported`, one kernel (`triton.row_swiglu`) computes both halves of a
    row and the product, rounded as the eager ops round; for 2 to 64 rows where
    `few_rows_kernel_supported`, the few-row kernel does the same (`triton.few_rows_swiglu`); else the
    module and two elementwise ops."""
    if lin.bias is None and row_kernel_supported(z, lin.weight):
        return _triton().row_swiglu_triton(z, lin.weight)
    if lin.bias is None and few_rows_kernel_supported(z, lin.weight):
        return _triton().few_rows_swiglu_triton(z, lin.weight)
    gate, up = linear(z, lin).split(lin.out_features // 2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def row_linear_gates(x: torch.Tensor, lin: torch.nn.Linear, gate_lin: torch.nn.Linear, cap: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """lin(x) and the fp32 soft-capped gate projection cap * tanh(gate_lin(x.float()) / cap) of one row
    in one kernel (`triton.row_linear_gates`). Needs `row_kernel_supported(x, lin.weight)` and fp32
    gate weights with a bias (the caller keeps its own code else)."""
    return _triton().row_linear_gates_triton(x, lin.weight, lin.bias, gate_lin.weight, gate_lin.bias, cap)


def head_norm_gate_supported(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `head_norm_gate` has its one-pass kernel for these tensors: 16-bit h, o and weight of one
    dtype where the Triton kernels run, with no gradient needed (the caller keeps its torch code else)."""
    return o.dtype == h.dtype and not _needs_grad(o) and _inference_16bit(h, weight)


def head_norm_gate(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """sigmoid(o) * MultiHeadLayerNorm(h) in one pass (see `triton.norm_gate`): h [..., NH, DH],
    o [..., NH * DH], weight [NH * DH] -> [..., NH * DH]. Needs `head_norm_gate_supported`."""
    mod = _triton()
    if mod is None:
        raise RuntimeError("head_norm_gate needs the Triton kernels, which are unavailable")
    return mod.head_norm_gate_triton(h, o, weight, eps)


def triton_module():
    """`fast_xlstm.ops.triton` (imported on first use), or None where Triton cannot be imported."""
    return _triton()


def planned_prefill_supported(x: torch.Tensor) -> bool:
    """Whether tensors like `x` run the Triton kernels, which the device-table prefill needs."""
    try:
        return resolve_backend(x).name == "triton"
    except ValueError:
        return False


def mlstm_chunkwise_planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
                            initial_state: MLSTMState, plan: "PackedPlan", *, eps: float = 1e-6,
                            state_rows: torch.Tensor | None = None, final_to_pool: bool = False
                            ) -> tuple[torch.Tensor, MLSTMState | None]:
    """Packed inference forward from a `triton.PackedPlan` (no host sync). With `state_rows` (int64 [N]),
    `initial_state` is a state pool and sequence r starts from its row state_rows[r]; `final_to_pool`
    writes the final states back into those rows (and returns None for them). Shapes: see
    `triton.planned.mlstm_chunkwise_planned`."""
    mod = _triton()
    if mod is None:
        raise RuntimeError("the planned (device-table) prefill needs the Triton kernels, which are unavailable")
    return mod.mlstm_chunkwise_planned(q, k, v, i, f, initial_state, plan, eps=eps, state_rows=state_rows,
                                       final_to_pool=final_to_pool)
