"""The mLSTM layer of the xLSTM 7B block: projections, soft-capped gates, the cell, norm, output gate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import ops
from ..config import XLSTMConfig
from ..ops import MLSTMState
from .layers import MultiHeadLayerNorm, soft_cap

if TYPE_CHECKING:  # the Triton package is imported only where the kernels run
    from ..ops.triton import PackedPlan


# Most rows (tokens) for which a compiled gate projection is a fused reduction rather than a GEMM.
GATE_REDUCTION_MAX_ROWS = 256


def _linear_fp32(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    """A gate projection in fp32 (a no-op cast when the loader kept the gate weights in fp32).

    x [..., d] -> [..., out]. Compiled for decode or a short prefill (at most
    `GATE_REDUCTION_MAX_ROWS` rows, a few output rows), it is written as a product and a sum:
    inductor fuses the upcast, products, sum and the caller's soft cap into one reduction kernel,
    where an fp32 GEMM call costs three (upcast copy, SIMT GEMM, split-K reduce) per layer. With
    dynamic shapes the row test becomes a guard: one compiled variant each side of it. Everything
    else (longer inputs, eager calls) goes to `ops.gate_projection`: for bf16 x where the Triton
    kernels run, one tensor-core kernel that reads x once; elsewhere the fp32 GEMM.
    """
    if (torch.compiler.is_compiling() and lin.out_features <= 64
            and math.prod(x.shape[:-1]) <= GATE_REDUCTION_MAX_ROWS):
        return (x.float()[..., None, :] * lin.weight.float()).sum(-1) + lin.bias.float()
    return ops.gate_projection(x, lin.weight, lin.bias)


class MLSTMLayer(nn.Module):
    """y = out_proj(sigmoid(o) * MultiHeadLayerNorm(mLSTM(q, k, v, i, f))) for normed input u.

    Gate projections (igate/fgate, 8 rows each for the 7B) are kept and computed in fp32 whatever the
    model dtype, as in training. `fuse()` concatenates q/k/v/o rows into one projection.
    """

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        c = config
        self.num_heads, self.qk_dim, self.v_dim = c.num_heads, c.qk_dim, c.v_dim
        self.gate_soft_cap = c.gate_soft_cap
        self.eps = c.eps
        self.chunk_size = c.chunk_size
        d = c.embedding_dim
        self.q = nn.Linear(d, self.qk_dim, bias=c.use_bias)
        self.k = nn.Linear(d, self.qk_dim, bias=c.use_bias)
        self.v = nn.Linear(d, self.v_dim, bias=c.use_bias)
        self.ogate_preact = nn.Linear(d, self.v_dim, bias=c.use_bias)
        self.igate_preact = nn.Linear(d, c.num_heads, bias=True)
        self.fgate_preact = nn.Linear(d, c.num_heads, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(c.num_heads, c.v_head_dim, eps=c.norm_eps,
                                                 force_float32=c.norm_reduction_force_float32)
        self.out_proj = nn.Linear(self.v_dim, d, bias=c.use_bias)
        self.fused = False

    @torch.no_grad()
    def fuse(self) -> None:
        """Builds `qkv_opreact` ([2*qk + 2*v, d]) and `ifgate_preact` ([2*NH, d]) from the single weights."""
        if self.fused:
            return
        parts = [self.q, self.k, self.v, self.ogate_preact]
        w0 = self.q.weight
        qkvo = nn.Linear(w0.shape[1], sum(p.out_features for p in parts), bias=self.q.bias is not None,
                         device=w0.device, dtype=w0.dtype)
        qkvo.weight.copy_(torch.cat([p.weight for p in parts], 0))
        if self.q.bias is not None:
            qkvo.bias.copy_(torch.cat([p.bias for p in parts], 0))
        gi, gf = self.igate_preact, self.fgate_preact
        ifg = nn.Linear(w0.shape[1], 2 * self.num_heads, bias=True, device=gi.weight.device, dtype=gi.weight.dtype)
        ifg.weight.copy_(torch.cat([gi.weight, gf.weight], 0))
        ifg.bias.copy_(torch.cat([gi.bias, gf.bias], 0))
        self.qkv_opreact, self.ifgate_preact = qkvo, ifg
        del self.q, self.k, self.v, self.ogate_preact, self.igate_preact, self.fgate_preact
        self.fused = True

    def _project_packed(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """u [..., d] -> q, k [..., qk], v, o [..., v] and the soft-capped gates [..., 2 NH] (fp32;
        input gate then forget gate)."""
        sizes = [self.qk_dim, self.qk_dim, self.v_dim, self.v_dim]
        if self.fused and self.ifgate_preact.weight.dtype == torch.float32 and ops.row_kernel_supported(
                u, self.qkv_opreact.weight):  # one row: both projections in one matrix-vector launch
            y, gates = ops.row_linear_gates(u, self.qkv_opreact, self.ifgate_preact, self.gate_soft_cap)
            q, k, v, o = y.split(sizes, dim=-1)
        elif self.fused:
            q, k, v, o = ops.linear(u, self.qkv_opreact).split(sizes, dim=-1)
            gates = soft_cap(_linear_fp32(u, self.ifgate_preact), self.gate_soft_cap)
        else:
            q, k, v, o = (ops.linear(u, lin) for lin in (self.q, self.k, self.v, self.ogate_preact))
            gates = torch.cat([soft_cap(_linear_fp32(u, lin), self.gate_soft_cap)
                               for lin in (self.igate_preact, self.fgate_preact)], dim=-1)
        return q, k, v, o, gates

    def _project(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """u [..., d] -> q, k [..., qk], v, o [..., v], i, f [..., NH] (gates soft-capped, fp32)."""
        q, k, v, o, gates = self._project_packed(u)
        i, f = gates.split(self.num_heads, dim=-1)
        return q, k, v, o, i, f

    def _output(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """h [..., NH, DV] cell output, o [..., v] gate pre-activation -> [..., d].

        At inference with the Triton kernels, the norm and gate are one kernel (`ops.head_norm_gate`),
        over sequences (h [B, S, NH, DV]; compiled, they were two passes at ~4.5x their bytes' time)
        and over a decode step's rows (h [B, NH, DV]; compiled, two launches)."""
        norm = self.multihead_norm
        if h.dim() >= 3 and norm.force_float32 and ops.head_norm_gate_supported(h, o, norm.weight):
            return ops.linear(ops.head_norm_gate(h, o, norm.weight, norm.eps), self.out_proj)
        return ops.linear(torch.sigmoid(o) * norm(h), self.out_proj)

    def forward(self, u: torch.Tensor, state: MLSTMState | None = None, *,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
        """u [B, S, d] (normed block input) -> y [B, S, d] and the final state (N sequences)."""
        B, S, _ = u.shape
        q, k, v, o, i, f = self._project(u)
        h, state = self.cell(q, k, v, i, f, state, cu_seqlens)
        return self._output(h, o), state

    def cell(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
             state: MLSTMState | None, cu_seqlens: torch.Tensor | None,
             plan: "PackedPlan | None" = None, state_rows: torch.Tensor | None = None,
             final_to_pool: bool = False) -> tuple[torch.Tensor, MLSTMState | None]:
        """The mLSTM cell over sequences: q, k [B, S, qk], v [B, S, v], i, f [B, S, NH] ->
        h [B, S, NH, DV] and the final state (through the ops dispatch). `plan`: a
        `ops.triton.PackedPlan` for packed input (B = 1) with device-side tables, instead of cu_seqlens;
        with it, `state_rows` (int64 [N]) makes `state` a state pool whose rows state_rows[r] the
        kernel reads in place as the initial states, and `final_to_pool` has the kernel write the final
        states back into those rows (the returned state is then None). q, k, v and the gates go to the
        kernels as strided views of the projections (no copies)."""
        B, S, _ = q.shape
        nh = self.num_heads
        q, k, v = (x.reshape(B, S, nh, -1).transpose(1, 2) for x in (q, k, v))  # [B, NH, S, D*]
        if state_rows is not None and plan is None:
            raise ValueError("state_rows (initial states from pool rows) needs a plan")
        if plan is not None:
            h, state = ops.mlstm_chunkwise_planned(q, k, v, i.transpose(1, 2), f.transpose(1, 2), state, plan,
                                                   eps=self.eps, state_rows=state_rows, final_to_pool=final_to_pool)
        else:
            h, state = ops.mlstm_chunkwise(q, k, v, i.transpose(1, 2), f.transpose(1, 2), state,
                                           cu_seqlens=cu_seqlens, chunk_size=self.chunk_size, eps=self.eps)
        return h.transpose(1, 2), state

    def step(self, u: torch.Tensor, state: MLSTMState | None) -> tuple[torch.Tensor, MLSTMState]:
        """One decode step: u [B, d] -> y [B, d] and the new state."""
        B = u.shape[0]
        q, k, v, o, i, f = self._project(u)
        nh = self.num_heads
        h, state = ops.mlstm_step(q.reshape(B, nh, -1), k.reshape(B, nh, -1), v.reshape(B, nh, -1), i, f, state,
                                  eps=self.eps)
        return self._output(h, o), state

    def step_slots(self, u: torch.Tensor, pool: MLSTMState, slots: torch.Tensor) -> torch.Tensor:
        """One decode step on state-pool rows: u [B, d] -> y [B, d]; pool rows `slots` (-1 = skip)
        are updated in place, so the step can run inside a CUDA graph on static buffers."""
        q, k, v, o, gates = self._project_packed(u)
        # the gates go to the step op as one tensor: as two, inductor writes each with a kernel of its own
        return self._output(self.cell_slots(q, k, v, gates, None, pool, slots), o)

    def cell_slots(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                   f: torch.Tensor | None, pool: MLSTMState, slots: torch.Tensor) -> torch.Tensor:
        """The cell's decode step on state-pool rows: q, k [B, qk], v [B, v], i, f [B, NH] or i the
        packed gates [B, 2 NH] with f None (views of the projections are read in place) ->
        h [B, NH, DV]; pool rows `slots` (-1 = skip) updated."""
        B, nh = q.shape[0], self.num_heads
        return ops.mlstm_step_slots_(q.reshape(B, nh, -1), k.reshape(B, nh, -1), v.reshape(B, nh, -1), i, f,
                                     *pool, slots, eps=self.eps)
