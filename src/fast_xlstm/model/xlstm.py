"""xLSTM language model: embedding, a stack of mLSTM blocks, out norm, soft-capped head.

Module names follow the hub checkpoint keys (`backbone.embeddings`, `backbone.blocks.{i}...`,
`backbone.out_norm`, `lm_head`), so a hub state dict loads without renaming.
The recurrent state is a value the caller owns: a list with one (C, n, m) tuple per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import XLSTMConfig
from ..ops import MLSTMState
from .layers import FeedForward, RMSNorm, soft_cap
from .mlstm import MLSTMLayer

if TYPE_CHECKING:  # the Triton package is imported only where the kernels run
    from ..ops.triton import PackedPlan

ModelState = list[MLSTMState]
"""One (C [N, NH, DK, DV], n [N, NH, DK], m [N, NH, 1]) tuple per block."""

IGNORE_INDEX = -100
"""A label that carries no loss (`forward(labels=...)`): PyTorch's cross-entropy default."""


class MLSTMBlock(nn.Module):
    """Pre-norm block: x + mLSTM(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        c = config
        self.norm_mlstm = RMSNorm(c.embedding_dim, c.norm_eps, c.norm_reduction_force_float32)
        self.mlstm_layer = MLSTMLayer(c)
        self.norm_ffn = RMSNorm(c.embedding_dim, c.norm_eps, c.norm_reduction_force_float32)
        self.ffn = FeedForward(c.embedding_dim, c.ffn_dim, c.use_bias)

    def pre_cell(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [..., d] -> q, k, v, o, i, f: everything before the cell (one compiled region)."""
        return self.mlstm_layer._project(self.norm_mlstm(x))

    def post_cell(self, x: torch.Tensor, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual input x, cell output h [..., NH, DV] and o-gate o -> block output (one compiled region)."""
        x = x + self.mlstm_layer._output(h, o)
        # the residual goes to the down projection: for up to 64 rows its kernel adds it (no add kernel)
        return self.ffn(self.norm_ffn(x), residual=x)

    def compile_regions(self, *, dynamic: bool | None = None) -> None:
        """torch.compile (fullgraph) of `pre_cell` and `post_cell`, once: the code before and after the
        cell fuses into a few kernels while the cell stays a kernel call between them. dynamic: as
        torch.compile's (True for inference's varying token counts)."""
        if not getattr(self, "_regions_compiled", False):
            self.pre_cell = torch.compile(self.pre_cell, dynamic=dynamic, fullgraph=True)
            self.post_cell = torch.compile(self.post_cell, dynamic=dynamic, fullgraph=True)
            self._regions_compiled = True

    def forward(self, x: torch.Tensor, state: MLSTMState | None, cu_seqlens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MLSTMState]:  # x [B, S, d]
        q, k, v, o, i, f = self.pre_cell(x)
        h, state = self.mlstm_layer.cell(q, k, v, i, f, state, cu_seqlens)
        return self.post_cell(x, h, o), state

    def step(self, x: torch.Tensor, state: MLSTMState | None) -> tuple[torch.Tensor, MLSTMState]:  # x [B, d]
        y, state = self.mlstm_layer.step(self.norm_mlstm(x), state)
        x = x + y
        return self.ffn(self.norm_ffn(x), residual=x), state

    def step_slots(self, x: torch.Tensor, pool: MLSTMState, slots: torch.Tensor) -> torch.Tensor:
        """x [B, d] -> [B, d]; pool rows `slots` updated in place.

        The residual adds run on [B, 1, d] views: compiled on a 2-D x, inductor folds each
        `x + linear(..)` into one addmm, which on CUDA first copies x into the GEMM's output (a
        memcpy and a launch per projection); as plain adds they fuse into the next norm's kernel.
        At batches of 1-64 the FFN's residual add rides in the down projection's kernel.
        """
        x = x[:, None]
        x = x + self.mlstm_layer.step_slots(self.norm_mlstm(x[:, 0]), pool, slots)[:, None]
        x = self.ffn(self.norm_ffn(x), residual=x)
        return x[:, 0]

    def prefill_slots(self, x: torch.Tensor, pool: MLSTMState, rows: torch.Tensor,
                      plan: "PackedPlan") -> torch.Tensor:
        """Packed prefill x [1, T, d] of the plan's sequences from pool rows `rows` [N] int64 (updated in place).

        The kernels read the initial states straight from the pool rows (no gather kernels), and the
        output kernel writes the final states back (no scatter kernels): it runs after the states kernel
        has read every initial state, and padding sequences of the plan (which repeat real ones' rows)
        write nothing.
        """
        q, k, v, o, i, f = self.pre_cell(x)
        h, _ = self.mlstm_layer.cell(q, k, v, i, f, pool, None, plan=plan, state_rows=rows, final_to_pool=True)
        return self.post_cell(x, h, o)

    def mixed_slots(self, x: torch.Tensor, pool: MLSTMState, slots: torch.Tensor, rows: torch.Tensor,
                    plan: "PackedPlan") -> torch.Tensor:
        """x [1, D + T, d]: D decode rows (one token each, pool rows `slots` [D] int32, -1 = skip),
        then the packed prefill of the plan's sequences (pool rows `rows`) -> [1, D + T, d].

        The projections and the FFN run once over all D + T tokens (the weights are read once for
        both); the cell runs the decode step kernel on the first D rows and the chunkwise kernels
        on the rest, each on its own pool rows, updated in place."""
        D = slots.shape[0]
        q, k, v, o, i, f = self.pre_cell(x)
        h_dec = self.mlstm_layer.cell_slots(q[0, :D], k[0, :D], v[0, :D], i[0, :D], f[0, :D], pool, slots)
        h_pre, _ = self.mlstm_layer.cell(q[:, D:], k[:, D:], v[:, D:], i[:, D:], f[:, D:], pool, None, plan=plan,
                                         state_rows=rows, final_to_pool=True)
        return self.post_cell(x, torch.cat([h_dec[None], h_pre], dim=1), o)


class XLSTMBackbone(nn.Module):
    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(MLSTMBlock(config) for _ in range(config.num_blocks))
        self.out_norm = (RMSNorm(config.embedding_dim, config.norm_eps, config.norm_reduction_force_float32)
                         if config.add_out_norm else nn.Identity())


class XLSTMForCausalLM(nn.Module):
    """The xLSTM 7B architecture (or any `XLSTMConfig`) as a causal LM.

    `forward(input_ids, state)` runs a sequence (prefill/training); `step(token_ids, state)` one token.
    Both return fp32 logits soft-capped at `output_logit_soft_cap` and the new state; the input state
    is never modified.
    """

    def __init__(self, config: XLSTMConfig):
        super().__init__()
        self.config = config
        self.backbone = XLSTMBackbone(config)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Shares the embedding matrix with the head when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    # ---- construction and I/O ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: XLSTMConfig, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", seed: int | None = 0, init: str = "7b"
                    ) -> "XLSTMForCausalLM":
        """A randomly initialised model. init: "7b" (the 7B training recipe) or "random" (every weight,
        bias and norm drawn at random: for tests that must exercise all paths)."""
        from .init import init_weights

        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.tie_weights()  # to_empty makes new tensors, which would untie them
        init_weights(model, recipe=init, seed=seed)
        model.cast(dtype)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", fuse: bool = False) -> "XLSTMForCausalLM":
        """Loads a checkpoint directory in the hub layout or the `xlstm` package layout.

        Tensors stream one at a time from safetensors into a meta-initialised model, converted to
        `dtype` on the way (None keeps the checkpoint dtype), so peak host memory is one model.
        `fuse=True` builds the fused projections after loading.
        """
        from .weights import load_model

        model = load_model(cls, path, dtype=dtype, device=device)
        if fuse:
            model.fuse_projections()
        return model.eval()

    def save_pretrained(self, path: str | Path, *, max_shard_size: int | str = "5GB",
                        layout: str = "hub") -> Path:
        """Writes config + sharded safetensors: layout "hub" (transformers-loadable) or "xlstm"."""
        from .weights import save_model

        return save_model(self, path, max_shard_size=max_shard_size, layout=layout)

    @torch.no_grad()
    def cast(self, dtype: torch.dtype) -> "XLSTMForCausalLM":
        """Casts weights to `dtype`, keeping the i/f gate projections in fp32 (they ran in fp32 in training)."""
        gates = {id(p) for m in _gate_linears(self) for p in m.parameters()}
        for p in self.parameters():
            target = torch.float32 if id(p) in gates else dtype
            if p.dtype != target:
                p.data = p.data.to(target)
        return self

    def fuse_projections(self) -> "XLSTMForCausalLM":
        """Fuses q/k/v/o, i/f and gate/up projections in every block (for inference)."""
        for block in self.backbone.blocks:
            block.mlstm_layer.fuse()
            block.ffn.fuse()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    # ---- compute --------------------------------------------------------------------------------
    def _head(self, x: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(self.backbone.out_norm(x), self.lm_head).float()
        return soft_cap(logits, self.config.output_logit_soft_cap)

    def head_loss_sum(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed fp32 cross-entropy of the soft-capped head: x [..., d] last hidden states, labels [...]
        (IGNORE_INDEX = no loss) -> scalar. The same math as `_head` then cross-entropy; written as one
        function so that, compiled (training does), everything after the head GEMM fuses into a
        reduction over the model-dtype logits: no fp32 logits, and no fp32 logit gradient, are stored."""
        logits = self._head(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def forward(self, input_ids: torch.Tensor, state: ModelState | None = None, *,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None, last_logits_only: bool = False,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ModelState]:
        """Runs token sequences.

        Args:
            input_ids: [B, S] token ids; with `cu_seqlens`, [1, T] holding N packed sequences.
            state: per-block states for the B (or N) sequences; None = empty state.
            cu_seqlens: int tensor [N + 1] (or a list of N + 1 ints) of packed-sequence offsets into T
                (each sequence starts from its own state and none sees another's tokens). Every mLSTM
                layer reads the offsets on the host to plan its kernels: pass a list or a CPU tensor
                (a list also stays on the host under FSDP, which moves tensor arguments to the GPU;
                offsets in GPU memory cost a host sync per layer, forward and backward).
            last_logits_only: compute the head only at each sequence's last position.
            labels: int64 targets shaped like input_ids (IGNORE_INDEX = no loss): return the summed
                fp32 cross-entropy (a scalar, `head_loss_sum`) in place of the logits (training).
        Returns:
            logits fp32 [B, S, V] (or [N, V] with last_logits_only; or the loss with labels) and the
            new state.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape [B, S], got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read-back (one device sync), not two
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}), got values in [{lo}, {hi}]")
        if state is not None and len(state) != self.config.num_blocks:
            raise ValueError(f"state must hold {self.config.num_blocks} per-block states, got {len(state)}")
        if labels is not None:
            if last_logits_only:
                raise ValueError("labels (a loss over every position) and last_logits_only exclude each other")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
        if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
            cu_seqlens = torch.tensor([int(o) for o in cu_seqlens], dtype=torch.int32)
        x = self.backbone.embeddings(input_ids)
        new_state: ModelState = []
        for b, block in enumerate(self.backbone.blocks):
            x, st = block(x, None if state is None else state[b], cu_seqlens)
            new_state.append(st)
        if last_logits_only:
            if cu_seqlens is None:
                if input_ids.shape[1] == 0:
                    raise ValueError("last_logits_only needs at least one token per sequence")
                x = x[:, -1]
            else:
                lengths = cu_seqlens[1:] - cu_seqlens[:-1]
                if bool((lengths <= 0).any()):
                    raise ValueError("last_logits_only needs at least one token per packed sequence")
                x = x[0, cu_seqlens[1:].long() - 1]
        if labels is not None:
            return self.head_loss_sum(x, labels), new_state
        return self._head(x), new_state

    def step(self, token_ids: torch.Tensor, state: ModelState | None) -> tuple[torch.Tensor, ModelState]:
        """One decode step: token_ids [B] -> logits fp32 [B, V] and the new state."""
        if token_ids.ndim != 1:
            raise ValueError(f"token_ids must have shape [B], got {tuple(token_ids.shape)}")
        x = self.backbone.embeddings(token_ids)
        new_state: ModelState = []
        for b, block in enumerate(self.backbone.blocks):
            x, st = block.step(x, None if state is None else state[b])
            new_state.append(st)
        return self._head(x), new_state


    def step_slots(self, token_ids: torch.Tensor, pool: ModelState, slots: torch.Tensor) -> torch.Tensor:
        """One decode step for B rows whose states live in a state pool (updated in place).

        Args:
            token_ids: [B] tokens; pool: per-block (C [P, ...], n, m) tensors of P sequences;
            slots: [B] int32 pool rows, -1 = skip (padding rows of a CUDA-graph bucket).
        Returns:
            logits fp32 [B, V].
        """
        x = self.backbone.embeddings(token_ids)
        for block, layer_pool in zip(self.backbone.blocks, pool):
            x = block.step_slots(x, layer_pool, slots)
        return self._head(x)

    def prefill_slots(self, input_ids: torch.Tensor, pool: ModelState, rows: torch.Tensor, plan: "PackedPlan",
                      last_index: torch.Tensor) -> torch.Tensor:
        """Prefill of packed sequences whose states live in a state pool (updated in place), with no
        host sync, so the whole call can be captured in a CUDA graph (Triton kernels only).

        Args:
            input_ids: [1, T] tokens of the plan's sequences (positions outside them are ignored);
            pool: per-block (C [P, ...], n, m) tensors; rows: [N] int64 pool row of each sequence
                (rows repeated only for sequences the plan made duplicates of each other);
            plan: `ops.triton.PackedPlan` describing where the N sequences lie in T;
            last_index: [N] int64 position of each sequence's last token.
        Returns:
            logits fp32 [N, V] at the last positions.
        """
        x = self.backbone.embeddings(input_ids)
        for block, layer_pool in zip(self.backbone.blocks, pool):
            x = block.prefill_slots(x, layer_pool, rows, plan)
        return self._head(x[0].index_select(0, last_index))

    def mixed_slots(self, input_ids: torch.Tensor, pool: ModelState, slots: torch.Tensor, rows: torch.Tensor,
                    plan: "PackedPlan", last_index: torch.Tensor) -> torch.Tensor:
        """A decode step and a packed prefill as one forward, on state-pool rows (updated in place),
        with no host sync (CUDA-graph capturable): the GEMMs read the weights once for both.

        Args:
            input_ids: [1, D + T]: the D decode rows' tokens, then the prefill's T packed positions;
            pool: per-block (C [P, ...], n, m) tensors; slots: [D] int32 pool rows of the decode rows
                (-1 = skip: padding); rows, plan, last_index: the prefill's, as in `prefill_slots`
                (positions counted within the T).
        Returns:
            logits fp32 [D + N, V]: the decode rows', then each prefill sequence's last position's.
        """
        D = slots.shape[0]
        x = self.backbone.embeddings(input_ids)
        for block, layer_pool in zip(self.backbone.blocks, pool):
            x = block.mixed_slots(x, layer_pool, slots, rows, plan)
        return self._head(torch.cat([x[0, :D], x[0, D:].index_select(0, last_index)]))


def _gate_linears(model: XLSTMForCausalLM) -> set[nn.Module]:
    out: set[nn.Module] = set()
    for block in model.backbone.blocks:
        layer = block.mlstm_layer
        for name in ("igate_preact", "fgate_preact", "ifgate_preact"):
            if hasattr(layer, name):
                out.add(getattr(layer, name))
    return out
