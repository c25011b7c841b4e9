"""The model runner: owns every tensor of serving (state pool, per-slot sampling inputs, CUDA graphs).

Per-slot buffers have one extra row, index `num_slots`, that padding rows of a graph bucket read
and write, so a padded batch never touches a live request. The decode step (embedding, all blocks,
head, soft cap, penalties, sampling, logprobs) reads everything it needs from these buffers through
the slot indices, so a step's only host inputs are the slot list, and its only output is the
sampled tokens: on CUDA it is one graph replay per step.

Short prefills (at most `max_graph_prefill_tokens` tokens of at most 8 prompts) are CUDA graphs
too: the tokens are packed into a bucket of T positions (a power of two) for N sequences (1, 2, 4
or 8), the Triton kernels read their sequence tables from the device (`ops.triton.PackedPlan`), and
states move between the pool rows and the kernels inside the graph. Eager, such a prefill costs
tens of milliseconds of kernel launches on the 7B, more than its GPU time. Longer prefills run
eagerly, where the GPU is the bottleneck anyway.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import ops
from ..generation.params import SamplingParams
from ..generation.sampling import (apply_penalties, counter_exponential_noise, prompt_mask_from_ids, sample,
                                   token_logprobs)
from ..model import ModelState, XLSTMForCausalLM
from ..ops.transfer import copy_to_device, device_ints
from ..state import StatePool

if TYPE_CHECKING:  # the Triton package is imported only where the kernels can run
    from ..ops.triton import PackedLayout

logger = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_GRAPH_SEQS = (1, 2, 4, 8)  # sequence-count buckets of graph prefills
PREFILL_GRAPH_MIN_TOKENS = 16  # smallest token bucket (the kernels' smallest chunk)
LOGPROBS_K = 20  # the most alternatives a decode step reports (OpenAI's limit)
MIXED_WARM_UP_PROMPT = 512  # mixed-step graphs warmed up: 1, 2 and 4 prompts of this length, every decode bucket


def compile_block_steps(model: XLSTMForCausalLM, mode: str | None = None, batch1_mode: str | None = None) -> None:
    """Regional torch.compile of the decode step of every block: the blocks share one compiled
    graph (parameters are graph inputs), which fuses each block's ~80 small kernels (norms, gates,
    cell update, output gate, SwiGLU glue) into a few; CUDA-graph capture then records those.
    mode: a torch.compile mode, e.g. "max-autotune-no-cudagraphs" (benchmarks GEMM kernels per
    batch bucket: slower start-up).

    batch1_mode: another mode for steps of one row. Dynamo compiles the first batch size it sees for
    that static shape and every later one as one dynamic-shape graph, so one-row steps always have a
    graph of their own, and tuning it costs nothing at other sizes. (Before the one-row projections
    had a kernel of their own, max-autotune there had inductor write them as reductions fused with
    the norms around them: 5.96 instead of 6.36 ms a 7B step on an H100, while the same mode for the
    shared graph was slower at batch 64 and 256: bench/results/h100-profile/autotune-ee2cb48.)"""
    for block in model.backbone.blocks:
        if getattr(block, "_step_slots_compiled", False):
            continue
        general = torch.compile(block.step_slots, fullgraph=True, mode=mode)
        if batch1_mode is not None and batch1_mode != mode:
            block.step_slots = _by_rows(torch.compile(block.step_slots, fullgraph=True, mode=batch1_mode), general)
        else:
            block.step_slots = general
        block._step_slots_compiled = True


def _by_rows(one_row: Callable[..., torch.Tensor], general: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A block's step_slots that runs `one_row` on x [1, d] and `general` on any other batch (the
    choice is made when a step is traced or captured; a graph replay runs no Python)."""
    def step_slots(x: torch.Tensor, pool, slots: torch.Tensor) -> torch.Tensor:
        return (one_row if x.shape[0] == 1 else general)(x, pool, slots)
    return step_slots


def compile_prefill_regions(model: XLSTMForCausalLM) -> None:
    """Regional torch.compile of each block's code before and after the cell (norms, projections,
    gates, output gate, SwiGLU), with dynamic token counts; the cell stays a kernel call between
    them. Short prefills are launch-bound in eager mode (~80 kernels a block); this fuses them."""
    for block in model.backbone.blocks:
        block.compile_regions(dynamic=True)


def balanced_groups(n: int, most: int) -> list[tuple[int, int]]:
    """[start, end) bounds that split n items into the fewest groups of at most `most`, as even as
    possible. An eager prefill forward of one or two sequences is launch-bound (tens of ms of host
    work on the 7B whatever its length), so 32 prompts under a 31-sequence bound run as 16 + 16,
    not 31 + a straggler of 1."""
    count = -(-n // most)
    size, extra = divmod(n, count) if n else (0, 0)
    bounds, start = [], 0
    for g in range(count):
        end = start + size + (g < extra)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class DecodeMode:
    """Which decode variant a batch needs; each is a separate CUDA graph per bucket."""

    sample: bool  # False: argmax for every row
    filters: bool  # any top-k / top-p / min-p
    penalties: bool  # any repetition / presence / frequency penalty
    logprobs: bool  # any row wants logprobs
    logits: bool = False  # also keep the step's raw logits in `out_logits` (tests, debugging)

    @classmethod
    def of(cls, params: list[SamplingParams]) -> "DecodeMode":
        return cls(sample=any(not p.is_greedy for p in params),
                   filters=any(not p.is_greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0) for p in params),
                   penalties=any(p.has_penalties for p in params),
                   logprobs=any(p.logprobs is not None for p in params))


@dataclass
class _PlannedPrefill:
    """One (sequences, tokens) bucket of the device-table prefill: its static input buffer
    (int64: tokens [T] | pool rows [N] | last positions [N] | kernel tables) and its graph. With
    `decode_bucket` > 0 it is a mixed step: that many decode rows (pool rows in `dec_slots`, int32,
    -1 = padding) ride in the same forward ahead of the prefill."""

    layout: "PackedLayout"
    buf: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    decode_bucket: int = 0
    dec_slots: torch.Tensor | None = None


@dataclass
class PendingDecode:
    """A launched decode step: host copies of its outputs (tokens, then logprobs, top values and
    ids when asked), filled once `event` has passed (None: already there)."""

    host: list[torch.Tensor]
    logits: torch.Tensor | None
    event: torch.cuda.Event | None


@dataclass
class StepResult:
    """Per batch row: sampled token, and (when asked) its logprob and the top alternatives."""

    tokens: list[int]
    logits: torch.Tensor | None = None  # [B, V] when the mode asked for them
    logprobs: list[float] | None = None
    top_vals: list[list[float]] | None = None
    top_ids: list[list[int]] | None = None

    def rows(self, start: int, stop: int) -> "StepResult":
        """Rows [start, stop) of this result."""
        def part(x):
            return None if x is None else x[start:stop]
        return StepResult(self.tokens[start:stop], part(self.logits), part(self.logprobs), part(self.top_vals),
                          part(self.top_ids))


def _piece_lengths(pieces: list[list[int] | None]) -> list[int]:
    """Tokens per piece; a None piece (a slot's last sampled token, fed on the device) is one."""
    return [1 if p is None else len(p) for p in pieces]


def _packed_ids(pieces: list[list[int] | None]) -> list[int]:
    """The pieces' token ids end to end; a None piece (a slot's last sampled token, fed on the device)
    holds a 0 in its place."""
    return [t for p in pieces for t in ((0,) if p is None else p)]


def _token_span(layout: "PackedLayout") -> int:
    """Entries a device-table prefill buffer gives the tokens: the layout's T rounded up to even, so
    the int64 sections after it start 16-byte aligned (Triton specializes its kernels on pointer
    alignment: an odd T would compile new variants of them mid-request)."""
    return layout.num_tokens + layout.num_tokens % 2


def _plan_buffer_values(layout: "PackedLayout", slots: list[int], pieces: list[list[int] | None]) -> list[int]:
    """The int64 buffer of a device-table prefill: tokens [`_token_span`] (zero-padded; 0 for a None
    piece, fed on the device) | pool rows [N] | last positions [N] | kernel tables, where N and T are
    the layout's (spare sequences repeat a real one)."""
    tri = ops.triton_module()
    offsets = [0, *itertools.accumulate(_piece_lengths(pieces))]
    ids = _packed_ids(pieces)
    return (ids + [0] * (_token_span(layout) - len(ids)) + tri.padded_rows(layout, offsets, slots)
            + tri.padded_rows(layout, offsets, [o - 1 for o in offsets[1:]]) + tri.plan_values(layout, offsets))


class ModelRunner:
    def __init__(self, model: XLSTMForCausalLM, *, num_slots: int, state_dtype: torch.dtype = torch.float32,
                 use_cuda_graph: bool | None = None, compile_decode: bool = False, compile_prefill: bool = False,
                 max_graph_prefill_tokens: int = 2048, compile_mode: str | None = None,
                 batch1_compile_mode: str | None = "auto", prefill_in_pool: bool | None = None):
        """max_graph_prefill_tokens: prefills of at most this many tokens (rounded down to a power of
        two; 0 = none) run through the device-table path, captured as CUDA graphs on CUDA.
        prefill_in_pool: larger prefills also run the device-table kernels, eagerly, on the pool rows in
        place: one forward for every piece, no state copied out of the pool and back (None = wherever
        those kernels run; False = the packed forward on copied states, in groups bounded by
        `prefill_state_bytes`).
        batch1_compile_mode: another compile mode for one-row decode steps ("auto": `compile_mode`). See
        `compile_block_steps`. Their projections run the Triton matrix-vector kernel (`ops.linear`)
        in any mode; max-autotune, the default on CUDA until that kernel came, now only retunes the
        glue around it: on an H100 the 7B's batch 1 ran 177.1 tok/s with it and 180.3 without, and
        without it a cold start skips ~25 s of tuning (bench/results/h100-7b-row-linear)."""
        self.model = model
        if batch1_compile_mode == "auto":
            batch1_compile_mode = compile_mode
        if compile_decode:
            compile_block_steps(model, compile_mode, batch1_compile_mode)
        if compile_prefill:
            compile_prefill_regions(model)
        self.device = model.device
        self.vocab = model.config.vocab_size
        self.num_slots = P = num_slots
        self.pool = StatePool(model.config, P, dtype=state_dtype, device=self.device)
        self._state_bytes_per_seq = self.pool.nbytes // P
        self.prefill_state_bytes = 4 << 30  # most state bytes one prefill forward copies out and back
        self.use_cuda_graph = self.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph
        if self.use_cuda_graph and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        dev = self.device

        self.last_token = torch.zeros(P + 1, dtype=torch.long, device=dev)
        # Per-slot sampling inputs: rows of two packed tensors, so a new request's setup is two
        # host-to-device copies instead of nine small kernels (host time on the path to a first token).
        self._long_params = torch.tensor([[0], [0], [0]], dtype=torch.long, device=dev).repeat(1, P + 1)
        self._float_params = torch.tensor([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]], device=dev).repeat(1, P + 1)
        self.steps, self.seeds, self.top_k = self._long_params.unbind(0)
        self.temperature, self.top_p, self.min_p, self.rep, self.pres, self.freq = self._float_params.unbind(0)
        self.counts: torch.Tensor | None = None  # [P + 1, V] int32, made when a request uses penalties
        self.prompt_mask: torch.Tensor | None = None  # [P + 1, V] bool
        self.buckets = sorted({b for b in GRAPH_BUCKETS if b < P} | {P})  # batch sizes with a graph
        max_b = self.buckets[-1]
        self.slot_buf = torch.full((max_b,), -1, dtype=torch.int32, device=dev)
        self.out_tokens = torch.zeros(max_b, dtype=torch.long, device=dev)
        self.out_lp = torch.zeros(max_b, device=dev)
        self.out_top_vals = torch.zeros(max_b, LOGPROBS_K, device=dev)
        self.out_top_ids = torch.zeros(max_b, LOGPROBS_K, dtype=torch.long, device=dev)
        self.out_logits: torch.Tensor | None = None  # [max bucket, V], made on first use
        self._graphs: dict[tuple[int, DecodeMode], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._side_stream: torch.cuda.Stream | None = None
        if max_graph_prefill_tokens < 0:
            raise ValueError(f"max_graph_prefill_tokens must be >= 0, got {max_graph_prefill_tokens}")
        self.max_graph_prefill_tokens = max_graph_prefill_tokens
        # The device-table prefill needs the Triton kernels (on CUDA; on CPU only in their interpreter).
        supported = ops.planned_prefill_supported(model.lm_head.weight)
        self.planned_prefill = max_graph_prefill_tokens >= PREFILL_GRAPH_MIN_TOKENS and supported
        if prefill_in_pool and not supported:
            raise ValueError("prefill_in_pool needs the Triton kernels (a CUDA device, or their interpreter)")
        self.prefill_in_pool = supported if prefill_in_pool is None else prefill_in_pool
        # per (decode bucket, layout): 0 for a plain prefill (layouts are frozen dataclasses)
        self._planned: dict[tuple[int, "PackedLayout"], _PlannedPrefill] = {}
        self.prefill_logits: torch.Tensor | None = None  # [max sequences, V] fp32, the planned path's output
        self.mixed_logits: torch.Tensor | None = None  # [max bucket + max sequences, V] fp32, mixed steps'

    # ---- per-request setup ----------------------------------------------------------------------
    def start_request(self, slot: int, prompt_ids: list[int], params: SamplingParams, seed: int,
                      reset: bool = True) -> None:
        """Empties the slot's state (unless `reset` is False: the caller restores a state into it) and
        loads the request's sampling parameters into the slot buffers."""
        if reset:
            self.pool.reset([slot])
        top_k = params.top_k if 0 < params.top_k < self.vocab else 0
        copy_to_device(self._long_params[:, slot], torch.tensor([0, seed, top_k]))
        copy_to_device(self._float_params[:, slot], torch.tensor(
            [params.temperature, params.top_p, params.min_p, params.repetition_penalty, params.presence_penalty,
             params.frequency_penalty], dtype=torch.float32))
        if params.has_penalties and self.counts is None:
            self.counts = torch.zeros(self.num_slots + 1, self.vocab, dtype=torch.int32, device=self.device)
            self.prompt_mask = torch.zeros(self.num_slots + 1, self.vocab, dtype=torch.bool, device=self.device)
            self._graphs.clear()  # captured graphs do not read the new buffers ...
            self._graph_pool = None  # ... and their memory pool dies with them: never capture into it again
        if self.counts is not None:
            self.counts[slot] = 0
            self.prompt_mask[slot] = prompt_mask_from_ids([prompt_ids], self.vocab, self.device)[0] \
                if params.repetition_penalty != 1.0 else False

    def snapshot(self, slot: int) -> ModelState:
        """A copy of the slot's state (for the prefix cache or a session)."""
        return self.pool.read([slot])

    def restore(self, slot: int, state: ModelState) -> None:
        self.pool.write([slot], state)

    # ---- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slots: list[int], pieces: list[list[int] | None], last: list[bool], modes: list[SamplingParams],
                on_launched: Callable[[], None] | None = None) -> StepResult:
        """Runs prompt pieces packed in one row, from each slot's current state, writing states back.

        Rows whose piece ends their prompt (`last`) get their first token sampled; returns those.
        A piece None is one token: the one its slot sampled last, read on the device (a decoding
        request riding in the prefill's forward; see `LLMEngine(mixed_steps=True)`).
        `on_launched` is called once the forward is queued on the device, before its results are read.
        """
        pending = self.prefill_launch(slots, pieces, last, modes)
        if on_launched is not None:
            on_launched()
        return self.prefill_collect(pending)

    @torch.inference_mode()
    def prefill_launch(self, slots: list[int], pieces: list[list[int] | None], last: list[bool],
                       modes: list[SamplingParams]) -> "PendingDecode":
        """Queues `prefill`'s forward and sampling without waiting for either; `prefill_collect` waits."""
        lengths = _piece_lengths(pieces)
        dec = [j for j, p in enumerate(pieces) if p is None]
        pre = [j for j, p in enumerate(pieces) if p is not None]
        mixed = self.mixed_layout(len(dec), [lengths[j] for j in pre])
        mixed_in_pool = (mixed is None and self._mixes_in_pool(len(dec), len(pre))
                         and len(set(slots)) == len(slots))
        layout = None if mixed is not None or mixed_in_pool else self._planned_layout(lengths)
        if mixed is not None or mixed_in_pool:
            pre_slots, pre_pieces, dec_slots = [slots[j] for j in pre], [pieces[j] for j in pre], [slots[j] for j in dec]
            logits = (self._prefill_planned(mixed, pre_slots, pre_pieces, dec_slots=dec_slots) if mixed is not None
                      else self._prefill_in_pool(pre_slots, pre_pieces, dec_slots=dec_slots))
            if dec[-1] > pre[0]:  # rows come decode first: back to the pieces' order
                order = dec + pre
                inverse = [0] * len(order)
                for r, j in enumerate(order):
                    inverse[j] = r
                logits = logits[device_ints(inverse, self.device)]
        elif layout is not None:
            logits = self._prefill_planned(layout, slots, pieces)
        elif self.prefill_in_pool and min(lengths) >= 1 and len(set(slots)) == len(slots):
            logits = self._prefill_in_pool(slots, pieces)
        else:
            # The states of a group are copied out of the pool and back: groups bound that copy's memory.
            bounds = balanced_groups(len(slots), max(1, self.prefill_state_bytes // self._state_bytes_per_seq))
            logits = torch.cat([self._prefill_group(slots[a:b], pieces[a:b]) for a, b in bounds])
        rows = [j for j, is_last in enumerate(last) if is_last]
        if not rows:
            return PendingDecode([], None, None)
        picked = logits if len(rows) == len(last) else logits[device_ints(rows, self.device)]
        pending = self._sample_launch(picked, [slots[j] for j in rows], DecodeMode.of([modes[j] for j in rows]))
        pending.logits = picked  # kept for forked siblings, which sample from the same distribution
        return pending

    def prefill_collect(self, pending: "PendingDecode") -> StepResult:
        """Waits for a launched prefill's sampled tokens (none when no piece ended its prompt)."""
        if not pending.host:
            return StepResult(tokens=[], logits=pending.logits)
        return self.decode_collect(pending)

    def _feed_last_tokens(self, ids: torch.Tensor, pieces: list[list[int] | None], slots: list[int]) -> None:
        """Writes into `ids` (int64 [T] on the device, pieces packed from position 0) the last sampled
        token of each slot whose piece is None, on the device: no host sync, so a step can feed the
        tokens of a step still in flight."""
        feed = [j for j, p in enumerate(pieces) if p is None]
        if feed:
            starts = list(itertools.accumulate(_piece_lengths(pieces), initial=0))
            src = self.last_token[device_ints([slots[j] for j in feed], self.device)]
            ids.index_copy_(0, device_ints([starts[j] for j in feed], self.device), src)

    def _prefill_group(self, slots: list[int], pieces: list[list[int] | None]) -> torch.Tensor:
        lengths = torch.tensor(_piece_lengths(pieces))
        # Offsets stay on the host: kernels plan their chunk tables from them without a device sync.
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        ids = device_ints(_packed_ids(pieces), self.device)
        self._feed_last_tokens(ids, pieces, slots)
        packed = ids[None]
        logits, state = self.model(packed, self.pool.read(slots), cu_seqlens=cu, last_logits_only=True)
        self.pool.write(slots, state)
        return logits

    def _prefill_in_pool(self, slots: list[int], pieces: list[list[int] | None], dec_slots: list[int] = ()
                         ) -> torch.Tensor:
        """Eager device-table prefill sized to these pieces: the kernels read each slot's state from its
        pool row and write the final state back, so the pool is never copied (the grouped path copies
        134 MB per 7B sequence out and back, and splits large packs into several forwards).
        With `dec_slots`, a mixed step: those slots decode their last sampled token in the same forward
        (the decode step's kernel on their rows). Returns logits [len(dec_slots) + len(slots), V]: the
        decode rows', then the pieces' last positions'."""
        tri = ops.triton_module()
        lengths = _piece_lengths(pieces)
        T, N = sum(lengths), len(pieces)
        cfg = self.model.config  # the chunk length the packed forward would take (128 for one long prompt)
        L = tri.inference_chunk_len(cfg.chunk_size, N, cfg.num_heads, max(lengths))
        layout = tri.PackedLayout(N, T, L)
        buf = device_ints(_plan_buffer_values(layout, slots, pieces), self.device)
        self._feed_last_tokens(buf[:T], pieces, slots)
        if not dec_slots:
            return self._forward_planned(layout, buf)
        return self._forward_planned(layout, buf, device_ints(list(dec_slots), self.device).to(torch.int32))

    def _mixes_in_pool(self, decode: int, pieces: int) -> bool:
        """Whether a step of `decode` decoding rows and `pieces` prompt pieces too large for a graph
        bucket (all on distinct slots) runs as one eager forward on the pool rows (the weights read
        once for both; the decode rows skip a forward of their own). Decode rows are bounded like a
        decode step's batch."""
        return decode >= 1 and pieces >= 1 and self.prefill_in_pool and decode <= self.buckets[-1]

    def can_mix(self, decode: int, lengths: list[int]) -> bool:
        """Whether `decode` decoding rows (on distinct slots) and prompt pieces of `lengths` run as one
        forward: a mixed CUDA graph (`mixed_layout`) or, for larger pieces, the eager in-pool forward."""
        return bool(lengths) and min(lengths) >= 1 and (
            self.mixed_layout(decode, lengths) is not None or self._mixes_in_pool(decode, len(lengths)))

    def mixed_layout(self, decode: int, lengths: list[int]) -> "PackedLayout | None":
        """The prefill layout of a mixed step: `decode` decoding rows and prompt pieces of `lengths`
        in one forward (the GEMMs read the weights once for both; the decode rows take the decode
        step's kernel, the pieces the chunkwise ones), replayed as a CUDA graph per (decode bucket,
        layout). None when there is no such graph (no decode rows or no pieces, or the pieces are
        too many or too long for a graph bucket): the caller runs decode and prefill apart."""
        if decode < 1 or decode > self.buckets[-1] or not lengths:
            return None
        return self._planned_layout(lengths)

    def _planned_layout(self, lengths: list[int]) -> "PackedLayout | None":
        """The smallest planned-prefill bucket that holds pieces of these lengths, or None."""
        total = sum(lengths)
        if not self.planned_prefill or len(lengths) > PREFILL_GRAPH_SEQS[-1] or min(lengths) < 1:
            return None
        tokens = max(PREFILL_GRAPH_MIN_TOKENS, 1 << (total - 1).bit_length())
        if tokens > self.max_graph_prefill_tokens:
            return None
        seqs = next(n for n in PREFILL_GRAPH_SEQS if n >= len(lengths))
        return ops.triton_module().PackedLayout(seqs, tokens, self.model.config.chunk_size)

    def _prefill_planned(self, layout: "PackedLayout", slots: list[int], pieces: list[list[int] | None],
                         dec_slots: list[int] = ()) -> torch.Tensor:
        """Prefill through the device-table path: fill the bucket's buffer, replay (or run and
        capture) its graph. With `dec_slots`, a mixed step: those slots decode (fed their last
        sampled token) in the same forward. Returns logits [len(dec_slots) + len(slots), V]: the
        decode rows', then the pieces' last positions'."""
        T, N = layout.num_tokens, layout.max_seqs
        D = len(dec_slots)
        bucket = self.bucket_for(D) if D else 0
        entry = self._planned.get((bucket, layout))
        if entry is None:
            entry = self._planned[(bucket, layout)] = _PlannedPrefill(
                layout, torch.zeros(_token_span(layout) + 2 * N + layout.size, dtype=torch.long, device=self.device),
                decode_bucket=bucket,
                dec_slots=torch.full((bucket,), -1, dtype=torch.int32, device=self.device) if bucket else None)
        if bucket and self.mixed_logits is None:
            self.mixed_logits = torch.zeros(self.buckets[-1] + PREFILL_GRAPH_SEQS[-1], self.vocab, device=self.device)
        elif not bucket and self.prefill_logits is None:
            self.prefill_logits = torch.zeros(PREFILL_GRAPH_SEQS[-1], self.vocab, device=self.device)
        copy_to_device(entry.buf, torch.tensor(_plan_buffer_values(layout, slots, pieces), dtype=torch.long))
        if bucket:
            copy_to_device(entry.dec_slots, torch.tensor(list(dec_slots) + [-1] * (bucket - D), dtype=torch.int32))
        self._feed_last_tokens(entry.buf[:T], pieces, slots)
        if entry.graph is not None:
            entry.graph.replay()
        elif self.use_cuda_graph:
            entry.graph = self._capture_prefill(entry)
        else:
            self._prefill_body(entry)
        # (the output buffers are the next step's too: copies leave them)
        if bucket:
            return torch.cat([self.mixed_logits[:D], self.mixed_logits[bucket:bucket + len(slots)]])
        return self.prefill_logits[:len(slots)].clone()

    def _prefill_body(self, entry: _PlannedPrefill) -> None:
        if entry.decode_bucket:
            rows = entry.decode_bucket + entry.layout.max_seqs
            self.mixed_logits[:rows].copy_(self._forward_planned(entry.layout, entry.buf, entry.dec_slots))
        else:
            self.prefill_logits[:entry.layout.max_seqs].copy_(self._forward_planned(entry.layout, entry.buf))

    def _forward_planned(self, layout: "PackedLayout", buf: torch.Tensor, dec_slots: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """The model's pool-row prefill from a device buffer laid out by `_plan_buffer_values`;
        logits [max_seqs, V] at each sequence's last position. With `dec_slots` (int32 [D], -1 =
        padding), a mixed step: those rows decode their slot's last sampled token in the same
        forward, and their logits come first ([D + max_seqs, V])."""
        T, N = layout.num_tokens, layout.max_seqs
        Tp = _token_span(layout)
        plan = ops.triton_module().PackedPlan.from_buffer(layout, buf[Tp + 2 * N:])
        rows, last = buf[Tp:Tp + N], buf[Tp + N:Tp + 2 * N]
        if dec_slots is None:
            return self.model.prefill_slots(buf[:T][None], self.pool.layers, rows, plan, last)
        fed = self.last_token[torch.where(dec_slots >= 0, dec_slots, self.num_slots).long()]
        return self.model.mixed_slots(torch.cat([fed, buf[:T]])[None], self.pool.layers, dec_slots, rows, plan, last)

    def capture_decode_on(self, stream: torch.cuda.Stream | None) -> None:
        """Drops the captured decode graphs and records later ones on `stream` (None: a side stream
        of the primary context again). Captured on a stream of a CUDA green context, the decode steps
        keep to that context's SMs (bench/overlap_probe.py --green-capture). The engine does not use
        it: on an H100, even with the SMs split disjointly (--green-disjoint), decode beside a prefill
        on the other SMs took 3% off the serial pair at batch 240 and 12% at batch 128."""
        self._graphs.clear()
        self._side_stream = stream

    def _warmup_stream(self) -> torch.cuda.Stream:
        """One side stream for every warm-up and capture (cuBLAS keeps a 32 MiB workspace per stream,
        and a capture on a fresh stream would add one more each time)."""
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.device)
        return self._side_stream

    def _capture_prefill(self, entry: _PlannedPrefill) -> torch.cuda.CUDAGraph:
        """Runs the prefill in the buffer for real (which also warms every kernel up), then records
        it; recording executes nothing, so the pool is advanced exactly once."""
        stream = self._warmup_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._prefill_body(entry)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
            self._prefill_body(entry)
        logger.debug("captured prefill graph for %d sequences in %d tokens", entry.layout.max_seqs,
                     entry.layout.num_tokens)
        return graph

    def sample_rows(self, logits: torch.Tensor, slots: list[int], params: list[SamplingParams]) -> StepResult:
        """Samples one token per row of `logits` [B, V] for the requests in `slots` and records it."""
        return self._sample_and_record(logits, device_ints(slots, self.device), DecodeMode.of(params))

    # ---- decode -----------------------------------------------------------------------------------
    def _sample_and_record(self, logits: torch.Tensor, rows: torch.Tensor, mode: DecodeMode,
                           out: torch.Tensor | None = None) -> StepResult | None:
        """Penalties, sampling and logprobs for rows of per-slot buffers `rows` [B] (scratch = P);
        records the token into the slot buffers. Graph-safe (no host sync) when `out` is given."""
        raw = logits
        if mode.penalties:
            logits = apply_penalties(logits, self.counts[rows], self.prompt_mask[rows], self.rep[rows],
                                     self.pres[rows], self.freq[rows])
        if mode.sample:
            noise = counter_exponential_noise(self.seeds[rows], self.steps[rows], self.vocab)
            tokens = sample(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows],
                            noise, do_top_k=mode.filters, do_top_p=mode.filters, do_min_p=mode.filters)
        else:
            tokens = logits.argmax(-1)
        self.last_token.index_copy_(0, rows, tokens)
        self.steps.index_add_(0, rows, torch.ones_like(rows))
        if mode.penalties:
            self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)
        lp = tv = ti = None
        if mode.logprobs:
            lp, tv, ti = token_logprobs(raw, tokens, LOGPROBS_K)
        if out is not None:  # graph path: results stay in static buffers
            n = tokens.shape[0]
            out[:n].copy_(tokens)
            if mode.logits:
                self.out_logits[:n].copy_(raw)
            if mode.logprobs:
                self.out_lp[:n].copy_(lp), self.out_top_vals[:n].copy_(tv), self.out_top_ids[:n].copy_(ti)
            return None
        if mode.logprobs:
            # One read-back (one host sync) instead of four: fp64 holds token ids and fp32 values exactly.
            k = tv.shape[1]
            host = torch.cat([tokens[:, None].double(), lp[:, None].double(), tv.double(), ti.double()], 1).tolist()
            return StepResult([int(r[0]) for r in host], raw if mode.logits else None, [r[1] for r in host],
                              [r[2:2 + k] for r in host], [[int(t) for t in r[2 + k:]] for r in host])
        return StepResult(tokens.tolist(), raw if mode.logits else None)

    def _decode_body(self, slots: torch.Tensor, mode: DecodeMode) -> None:
        """One decode step for the slot list `slots` [B] (-1 = padding), results in `out_*` buffers."""
        rows = torch.where(slots >= 0, slots, self.num_slots).long()
        logits = self.model.step_slots(self.last_token[rows], self.pool.layers, slots)
        self._sample_and_record(logits, rows, mode, out=self.out_tokens)

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the {self.num_slots} state slots")

    @torch.inference_mode()
    def decode(self, slots: list[int], mode: DecodeMode) -> StepResult:
        """One token for each request in `slots` (fed its last token), sampled in-device."""
        n = len(slots)
        self._replay_decode(slots, mode)
        tokens = self.out_tokens[:n].tolist()  # the step's one host sync
        logits = self.out_logits[:n].clone() if mode.logits else None
        if not mode.logprobs:
            return StepResult(tokens, logits)
        return StepResult(tokens, logits, self.out_lp[:n].tolist(), self.out_top_vals[:n].tolist(),
                          self.out_top_ids[:n].tolist())

    @torch.inference_mode()
    def decode_launch(self, slots: list[int], mode: DecodeMode) -> "PendingDecode":
        """Queues one decode step and the copy of its results to the host, without waiting for
        either; `decode_collect` waits. Steps queue in order on the device, and each feeds the
        token the previous one sampled (kept on the device), so the next step can be launched
        before the host has seen this one's tokens."""
        self._replay_decode(slots, mode)
        return self._pending_outputs(len(slots), mode)

    def _sample_launch(self, logits: torch.Tensor, slots: list[int], mode: DecodeMode) -> "PendingDecode":
        """Samples and records one token per row of `logits` [n, V] for `slots` into the step output
        buffers, and queues their copy to the host (no wait)."""
        self._sample_and_record(logits, device_ints(slots, self.device), mode, out=self.out_tokens)
        return self._pending_outputs(len(slots), mode)

    def _pending_outputs(self, n: int, mode: DecodeMode) -> "PendingDecode":
        """Queues the copy of the output buffers' first n rows to the host; the next step overwrites
        the buffers, so the copy is made now (in stream order)."""
        pinned = self.device.type == "cuda"
        outs = [self.out_tokens] + ([self.out_lp, self.out_top_vals, self.out_top_ids] if mode.logprobs else [])
        host = [torch.empty(t[:n].shape, dtype=t.dtype, pin_memory=pinned) for t in outs]
        for h, t in zip(host, outs):
            h.copy_(t[:n], non_blocking=pinned)
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record()
        logits = self.out_logits[:n].clone() if mode.logits else None
        return PendingDecode(host, logits, event)

    def _replay_decode(self, slots: list[int], mode: DecodeMode) -> None:
        """Runs the decode step for `slots` (its graph on CUDA); results land in the out_* buffers."""
        n = len(slots)
        b = self.bucket_for(n)
        if mode.logits and self.out_logits is None:
            self.out_logits = torch.zeros(self.buckets[-1], self.vocab, device=self.device)
        copy_to_device(self.slot_buf[:n], torch.tensor(slots, dtype=torch.int32))
        self.slot_buf[n:b].fill_(-1)
        if self.use_cuda_graph:
            graph = self._graphs.get((b, mode)) or self._capture(b, mode)
            graph.replay()
        else:
            self._decode_body(self.slot_buf[:b], mode)

    def decode_collect(self, pending: "PendingDecode") -> StepResult:
        """Waits for a launched step's results (the step's one host sync) and returns them."""
        if pending.event is not None:
            pending.event.synchronize()
        tokens, *lp = (h.tolist() for h in pending.host)
        return StepResult(tokens, pending.logits, *lp)

    def set_last_tokens(self, slots: list[int], tokens: list[int]) -> None:
        """Overrides the token each slot feeds next (teacher forcing in tests)."""
        self.last_token[torch.tensor(slots, device=self.device)] = torch.tensor(tokens, device=self.device)

    def _capture(self, bucket: int, mode: DecodeMode) -> torch.cuda.CUDAGraph:
        slots = self.slot_buf[:bucket]
        saved = slots.clone()
        slots.fill_(-1)  # warm-up and capture on padding rows only: no live request is touched
        stream = self._warmup_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_body(slots, mode)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=stream):
            self._decode_body(slots, mode)
        slots.copy_(saved)
        self._graphs[(bucket, mode)] = graph
        logger.debug("captured decode graph for batch %d, %s", bucket, mode)
        return graph

    def capture_all(self, mode: DecodeMode) -> None:
        """Captures `mode` for every bucket up front (largest first, so the pool fits them all)."""
        if self.use_cuda_graph:
            for b in reversed(self.buckets):
                if (b, mode) not in self._graphs:
                    self._capture(b, mode)

    @torch.inference_mode()
    def warm_up(self, modes: list[DecodeMode], mixed: bool = False, mixed_tokens: int | None = None) -> None:
        """Does ahead of the first request what would otherwise stall a live step: decode graphs of
        `modes` for every bucket, every graph-prefill bucket (N sequences in T tokens; with `mixed`,
        the usual mixed-step graphs too, and with `mixed_tokens` those of one or two prompt pieces
        in that many tokens, the engine's trickle prefill), and the
        JIT compiles of the eager prefill (the Triton kernels specialize on whether the packed
        length is a multiple of 16, so one of each). Uses the first slots and empties them after;
        call it before any request holds a slot."""
        for mode in modes:
            self.capture_all(mode)
        if self.planned_prefill:
            for n in (s for s in PREFILL_GRAPH_SEQS if s <= self.num_slots):
                t = PREFILL_GRAPH_MIN_TOKENS
                while t <= self.max_graph_prefill_tokens:
                    slots = list(range(n))
                    self.pool.reset(slots)
                    pieces = [[1] * (t // n)] * n  # powers of two, t >= 16 >= n
                    self._prefill_planned(self._planned_layout([len(p) for p in pieces]), slots, pieces)
                    t *= 2
            # Mixed steps of one, two or four prompts (a server's usual arrivals) for every
            # decode bucket; padding decode rows (-1) touch no slot. Other layouts capture on first use.
            shapes = [(n, MIXED_WARM_UP_PROMPT * n) for n in (1, 2, 4)]
            if mixed_tokens:
                shapes += [(n, max(mixed_tokens, PREFILL_GRAPH_MIN_TOKENS)) for n in (1, 2)]
            for n, t in shapes if mixed else ():
                if n <= self.num_slots and t <= self.max_graph_prefill_tokens:
                    self.pool.reset(list(range(n)))
                    pieces = [[1] * (t // n)] * n
                    for b in reversed(self.buckets):
                        self._prefill_planned(self._planned_layout([len(p) for p in pieces]), list(range(n)), pieces,
                                              dec_slots=[-1] * b)
        for total in (2 * self.max_graph_prefill_tokens + 16, 2 * self.max_graph_prefill_tokens + 17):
            if self.prefill_in_pool:  # one and two sequences: the kernels specialize on counts of 1
                for n in (1, 2) if self.num_slots >= 2 else (1,):
                    self.pool.reset(list(range(n)))
                    self._prefill_in_pool(list(range(n)), [[1] * (total // n)] * n)
            else:
                self.pool.reset([0])
                self._prefill_group([0], [[1] * total])
        self.pool.reset(list(range(min(self.num_slots, PREFILL_GRAPH_SEQS[-1]))))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
