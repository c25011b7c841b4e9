"""Triton kernels for the mLSTM cell (GPU; the CPU interpreter with TRITON_INTERPRET=1 for tests).

Importing this package imports triton. The ops dispatch (`fast_xlstm.ops`) registers these kernels
lazily as backend "triton", so `import fast_xlstm.ops` never needs triton.

  mlstm_chunkwise_triton  chunkwise prefill/training forward + backward (custom ops, autograd)
  mlstm_step_triton       fused decode step, functional
  mlstm_step_slots_       fused decode step on a state-slot pool, in place
  mlstm_chunkwise_planned packed inference forward from device-side tables (CUDA-graph capturable)
  gate_projection_triton  the fp32 i/f gate projection of a long prefill, one memory-bound kernel
  head_norm_gate_triton   the layer's per-head output norm and output gate over a prefill, one pass
  row_linear_triton       the matrix-vector product of one-row (batch-1) decode steps (+ residual)
  row_swiglu_triton       one-row fused up projection and SiLU(gate) * up
  row_linear_gates_triton one-row q/k/v/o projection and soft-capped fp32 gates in one launch
  few_rows_linear_triton  the matrix product of 2-64-row steps (small decode batches) on the tensor cores
                          (+ residual)
  few_rows_swiglu_triton  the same for the fused up projection and SiLU(gate) * up
"""

from __future__ import annotations

from ._common import device_ints
from .autograd import inference_chunk_len, mlstm_chunkwise_triton
from .few_rows_linear import few_rows_linear_triton, few_rows_swiglu_triton
from .gate_projection import gate_projection_triton
from .norm_gate import head_norm_gate_triton
from .planned import PackedLayout, PackedPlan, mlstm_chunkwise_planned, padded_rows, plan_values
from .row_linear import row_linear_gates_triton, row_linear_triton, row_swiglu_triton
from .step import mlstm_step_slots_, mlstm_step_triton

__all__ = ["mlstm_chunkwise_triton", "mlstm_step_triton", "mlstm_step_slots_", "mlstm_chunkwise_planned",
           "PackedLayout", "PackedPlan", "plan_values", "padded_rows", "device_ints",
           "inference_chunk_len", "gate_projection_triton", "head_norm_gate_triton",
           "row_linear_triton", "row_swiglu_triton", "row_linear_gates_triton", "few_rows_linear_triton",
           "few_rows_swiglu_triton"]
