"""The Triton chunkwise mLSTM as torch custom ops with autograd: `mlstm_chunkwise_triton`.

`fast_xlstm::mlstm_chunkwise_fwd` and `fast_xlstm::mlstm_chunkwise_bwd` are `torch.library` custom ops with
fake (meta) implementations, so torch.compile traces a model around them without graph breaks, and the
forward op has `register_autograd` wired to the backward op (torch wraps that pair in an
autograd.Function; `torch.library.opcheck` checks the registration in the tests).
Gradient semantics (row stabilizers constant, exact routing of the final m, dm0 = <dC0, C0> + <dn0, n0>):
see `chunkwise_bwd`. Shapes: see `mlstm_chunkwise_triton`.

What the backward reuses: the forward op also returns each position's within-chunk log decay and stabilizer
(8 bytes per position and head) and, unless `recompute_states` (or FAST_XLSTM_RECOMPUTE_STATES=1), the
chunk-start states, so the backward skips re-running the sequential states kernel. Those
states cost NH * DK * DV / chunk elements of memory per token while the graph holds them (32 KiB per token
at the 7B head shapes in bf16); under activation checkpointing only the recomputed block holds them.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .._checks import MLSTMState, check_cu_seqlens, check_sequence_inputs, check_state
from ._common import chunk_len, seq_tables, tl_dtype
from .chunkwise_bwd import mlstm_chunkwise_bwd
from .chunkwise_fwd import (chunk_state_dtype, inner_contiguous, kept_chunks, mlstm_chunkwise_fwd,
                            mlstm_chunkwise_fwd_train)


# Inference on one sequence's heads (fewer sequence-heads than this) of at least LONG_ALONE tokens runs
# 128-token chunks: the states kernel walks a sequence's chunks in order, and with so few recurrences in
# flight its time is the number of steps. H100, 7B head shapes, one sequence (bench/results/
# h100-kernels-1fa9942/chunk_sweep-fb683d3.json): 4k-65k tokens 5-9% faster than 64-token chunks (65k: 5.41 vs
# 5.72 ms); two sequences are 15-18% slower with 128. Training keeps the requested size (its backward is
# faster with 64: 14.5 vs 17.9 ms forward+backward at 65k).
FEW_SEQ_HEADS = 16
LONG_ALONE = 4096


def inference_chunk_len(chunk_size: int, n_seqs: int, num_heads: int, longest: int) -> int:
    """The forward's chunk length at inference for `n_seqs` sequences of `num_heads` heads whose longest
    has `longest` tokens: 128 for one sequence's heads of LONG_ALONE+ tokens (see FEW_SEQ_HEADS), else
    `chunk_len(chunk_size, longest)`."""
    if n_seqs * num_heads < FEW_SEQ_HEADS and longest >= LONG_ALONE and chunk_size >= 64:
        return chunk_len(128, longest)
    return chunk_len(chunk_size, longest)


def _prepare(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, *, contiguous: bool, inference: bool = False):
    """Tables, chunk length and the inputs as the kernels take them: k, v in q's dtype; with
    `contiguous` (the backward kernels) every input contiguous, else (the forward kernels, which read
    strided views) q, k, v only with a contiguous last dim and the gates as given. `inference`: the chunk
    length may follow the shape (see FEW_SEQ_HEADS), and packed input's follows its longest sequence;
    training (the custom ops) fixes it from the shapes alone, so that the kept chunk states' count is
    known to a traced graph (`kept_chunks`)."""
    B, NH, S, DK = q.shape
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    longest = S if offsets is None or not inference else max([b - a for a, b in zip(offsets, offsets[1:])] + [1])
    n_seqs = B if offsets is None else len(offsets) - 1
    L = inference_chunk_len(chunk_size, n_seqs, NH, longest) if inference else chunk_len(chunk_size, longest)
    tabs = seq_tables(B, NH, S, L, offsets, q.device)
    dt = q.dtype
    if contiguous:
        q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
        i, f = i.contiguous(), f.contiguous()
    else:
        q, k, v = (inner_contiguous(x.to(dt)) for x in (q, k, v))
    init = None if C0 is None else (C0.contiguous(), n0.contiguous(), m0.contiguous())
    return q, k, v, i, f, init, tabs, L


def _num_seqs(q: Tensor, cu_seqlens: Optional[Tensor]) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("fast_xlstm::mlstm_chunkwise_fwd", mutates_args=())
def chunkwise_fwd_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor],
                     n0: Optional[Tensor], m0: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
                     eps: float, keep_states: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns h [B, NH, S, DV] (q's dtype), final C, n, m [N, NH, 1] (fp32), then what the backward reuses:
    dsum, brow, mrow [B, NH, S] fp32 (signed normalizer sums, within-chunk log decay, stabilizers) and the
    chunk-start states CB [K, NH, DK, DV] (chunk-state dtype), NB [K, NH, DK], MB [K, NH] fp32 with
    K = `kept_chunks(...)` rows (packed input: an upper bound on its chunk count, which depends on the
    values of cu_seqlens), or K = 0 unless keep_states."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    if S == 0:
        h, Cf, nf, mf, dsum = _chunkwise_fwd(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, eps)
        return (h, Cf, nf, mf, dsum, dsum.clone(), dsum.clone(), *_empty_states(q, NH, DK, DV))
    q, k, v, i, f, init, tabs, L = _prepare(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, contiguous=False)
    alloc = kept_chunks(B, S, N, L, cu_seqlens is not None)
    h, (Cf, nf, mf), dsum, (brow, mrow), states = mlstm_chunkwise_fwd_train(q, k, v, i, f, init, tabs, L, eps,
                                                                            keep_states, alloc)
    return (h, Cf, nf, mf.unsqueeze(-1), dsum, brow, mrow, *(states or _empty_states(q, NH, DK, DV)))


def _empty_states(q: Tensor, NH: int, DK: int, DV: int) -> tuple[Tensor, Tensor, Tensor]:
    f32 = torch.float32
    return (q.new_empty(0, NH, DK, DV, dtype=chunk_state_dtype(q.dtype)), q.new_empty(0, NH, DK, dtype=f32),
            q.new_empty(0, NH, dtype=f32))


def _chunkwise_fwd(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor],
                   n0: Optional[Tensor], m0: Optional[Tensor], cu_seqlens: Optional[Tensor], chunk_size: int,
                   eps: float, token_major: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward itself (the custom op's body, whose outputs are contiguous as its fake says; the
    direct inference call asks for token-major h: see `run_out`)."""
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    if S == 0:
        if C0 is None:
            z = q.new_zeros
            return (q.new_empty(B, NH, 0, DV), z(N, NH, DK, DV, dtype=torch.float32), z(N, NH, DK, dtype=torch.float32),
                    z(N, NH, 1, dtype=torch.float32), q.new_empty(B, NH, 0, dtype=torch.float32))
        return (q.new_empty(B, NH, 0, DV), C0.float().clone(), n0.float().clone(), m0.float().clone(),
                q.new_empty(B, NH, 0, dtype=torch.float32))
    q, k, v, i, f, init, tabs, L = _prepare(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, contiguous=False,
                                            inference=True)
    h, (Cf, nf, mf), dsum = mlstm_chunkwise_fwd(q, k, v, i, f, init, tabs, L, eps, token_major=token_major)
    return h, Cf, nf, mf.unsqueeze(-1), dsum


@chunkwise_fwd_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, eps, keep_states):
    B, NH, S, DK = q.shape
    DV = v.shape[-1]
    N = _num_seqs(q, cu_seqlens)
    f32 = torch.float32
    rows = [q.new_empty(B, NH, S, dtype=f32) for _ in range(3)]
    if keep_states and S > 0:
        nct = kept_chunks(B, S, N, chunk_len(chunk_size, S), cu_seqlens is not None)
        states = (q.new_empty(nct, NH, DK, DV, dtype=chunk_state_dtype(q.dtype)), q.new_empty(nct, NH, DK, dtype=f32),
                  q.new_empty(nct, NH, dtype=f32))
    else:
        states = _empty_states(q, NH, DK, DV)
    return (q.new_empty(B, NH, S, DV), q.new_empty(N, NH, DK, DV, dtype=f32), q.new_empty(N, NH, DK, dtype=f32),
            q.new_empty(N, NH, 1, dtype=f32), *rows, *states)


@torch.library.custom_op("fast_xlstm::mlstm_chunkwise_bwd", mutates_args=())
def chunkwise_bwd_op(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, C0: Optional[Tensor],
                     n0: Optional[Tensor], m0: Optional[Tensor], cu_seqlens: Optional[Tensor], h: Tensor,
                     dsum: Tensor, brow: Tensor, mrow: Tensor, CB: Tensor, NB: Tensor, MB: Tensor, Cf: Tensor,
                     nf: Tensor, mf: Tensor, dh: Tensor, dCf: Optional[Tensor], dnf: Optional[Tensor],
                     dmf: Optional[Tensor], chunk_size: int, eps: float
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv (input dtypes), di, df (fp32), dC0, dn0, dm0 [N, NH, 1] (fp32). CB empty: the
    chunk-start states are rebuilt; dCf, dnf, dmf None: the loss does not use that part of the final state."""
    B, NH, S, DK = q.shape
    if S == 0:
        f32 = torch.float32
        zf = lambda g, like: (torch.zeros_like(like, dtype=f32) if g is None else g.float().clone())
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), i.new_zeros(i.shape, dtype=f32),
                f.new_zeros(f.shape, dtype=f32), zf(dCf, Cf), zf(dnf, nf), zf(dmf, mf))
    q, k, v, i, f, init, tabs, L = _prepare(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, contiguous=True)
    final = (Cf, nf, mf.squeeze(-1))
    states = (CB, NB, MB) if CB.shape[0] >= tabs.NCT and CB.shape[0] > 0 else None
    dq, dk, dv, di, df, dC0, dn0, dm0 = mlstm_chunkwise_bwd(
        q, k, v, i, f, init, h, dsum, final, dh, dCf, dnf, None if dmf is None else dmf.squeeze(-1), tabs, L, eps,
        rows=(brow, mrow), states=states)
    return dq, dk, dv, di, df, dC0, dn0, dm0.unsqueeze(-1)


@chunkwise_bwd_op.register_fake
def _(q, k, v, i, f, C0, n0, m0, cu_seqlens, h, dsum, brow, mrow, CB, NB, MB, Cf, nf, mf, dh, dCf, dnf, dmf,
      chunk_size, eps):
    f32 = torch.float32
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), i.new_empty(i.shape, dtype=f32),
            f.new_empty(f.shape, dtype=f32), torch.empty_like(Cf), torch.empty_like(nf), torch.empty_like(mf))


def _setup_context(ctx, inputs, output):
    q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, eps, _keep = inputs
    h, Cf, nf, mf, dsum, brow, mrow, CB, NB, MB = output
    ctx.save_for_backward(q, k, v, i, f, C0, n0, m0, cu_seqlens, h, dsum, brow, mrow, CB, NB, MB, Cf, nf, mf)
    ctx.chunk_size, ctx.eps = chunk_size, eps
    ctx.mark_non_differentiable(dsum, brow, mrow, CB, NB, MB)
    # Unused outputs (most often the final state of a training loss on h) reach the backward as None, not
    # as zero tensors: the backward then skips their products and the final-m routing.
    ctx.set_materialize_grads(False)


def _backward(ctx, dh, dCf, dnf, dmf, *_unused):
    q, k, v, i, f, C0, n0, m0, cu_seqlens, h, dsum, brow, mrow, CB, NB, MB, Cf, nf, mf = ctx.saved_tensors
    dh = torch.zeros_like(h) if dh is None else dh
    dq, dk, dv, di, df, dC0, dn0, dm0 = chunkwise_bwd_op(q, k, v, i, f, C0, n0, m0, cu_seqlens, h, dsum, brow, mrow,
                                                         CB, NB, MB, Cf, nf, mf, dh, dCf, dnf, dmf, ctx.chunk_size,
                                                         ctx.eps)
    if C0 is None:
        dC0 = dn0 = dm0 = None
    else:
        dC0, dn0, dm0 = dC0.to(C0.dtype), dn0.to(n0.dtype), dm0.to(m0.dtype)
    return dq, dk, dv, di.to(i.dtype), df.to(f.dtype), dC0, dn0, dm0, None, None, None, None


chunkwise_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def mlstm_chunkwise_triton(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,
                           initial_state: MLSTMState | None = None, *, cu_seqlens: Tensor | None = None,
                           chunk_size: int = 64, eps: float = 1e-6, recompute_states: bool | None = None
                           ) -> tuple[Tensor, MLSTMState]:
    """Chunkwise mLSTM in Triton; same contract as `ops.chunkwise_torch.mlstm_chunkwise_torch`.

    q, k [B, NH, S, DK]; v [B, NH, S, DV] (fp32, bf16 or fp16; k, v are cast to q's dtype);
    i, f [B, NH, S] gate pre-activations (any float dtype, used in fp32); initial_state
    (C [N, NH, DK, DV], n [N, NH, DK], m [N, NH, 1]) or None; cu_seqlens int [N + 1] for packed input (B = 1).
    chunk_size is rounded to a power of two in [16, 128] (a speed knob; results agree to rounding);
    inference on a single sequence's heads of 4,096+ tokens takes 128-token chunks for a chunk_size of 64
    or more (faster there; see FEW_SEQ_HEADS).
    Returns h [B, NH, S, DV] in q's dtype and the final state in initial_state's dtype (fp32 if None);
    outside autograd and torch.compile, h is token-major (h.transpose(1, 2) contiguous: see `run_out`).
    Differentiable in q, k, v, i, f and the initial state. recompute_states: the backward rebuilds the
    chunk-start states instead of keeping them from the forward (less memory, a slower backward); None
    reads FAST_XLSTM_RECOMPUTE_STATES (default: keep).
    """
    B, NH, S, DK, DV = check_sequence_inputs(q, k, v, i, f)
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    tl_dtype(q.dtype)
    N = B
    if cu_seqlens is not None:
        N = len(check_cu_seqlens(cu_seqlens, B, S)) - 1
    if initial_state is not None:
        check_state(initial_state, N, NH, DK, DV)
    C0, n0, m0 = initial_state if initial_state is not None else (None, None, None)
    tensors = (q, k, v, i, f, C0, n0, m0)
    needs_graph = torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
    # Inference outside torch.compile needs neither autograd nor tracing: calling the body directly
    # skips the custom-op dispatch, which costs about a millisecond of host time per call.
    if needs_graph:
        if recompute_states is None:
            recompute_states = os.environ.get("FAST_XLSTM_RECOMPUTE_STATES", "0") == "1"
        h, Cf, nf, mf = chunkwise_fwd_op(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, eps,
                                         not recompute_states)[:4]
    else:
        h, Cf, nf, mf, _ = _chunkwise_fwd(q, k, v, i, f, C0, n0, m0, cu_seqlens, chunk_size, eps, token_major=True)
    out_dtype = torch.float32 if initial_state is None else initial_state[0].dtype
    return h, (Cf.to(out_dtype), nf.to(out_dtype), mf.to(out_dtype))
