"""The two stacks the benchmark compares, behind one small interface.

- `OursStack`: our model with the engine's runner (state-slot pool, CUDA-graph decode per bucket).
- `OfficialStack`: the `xlstm` package's `xlstm_large` with the best kernels that run on the
  installed Triton, fused weights, and its decode step captured in a CUDA graph by this harness
  (as the paper's harness did), holding the same random weights.
Every call returns host-visible results, so timings include the syncs a real caller pays. Decode
reads every step's tokens on the host one step late: the next step is queued before the host waits
for the previous one's tokens (the feed token stays on the device), as a serving engine with async
scheduling does; both stacks are driven that way.
"""

from __future__ import annotations

import logging

import torch

from ..config import XLSTMConfig
from ..generation.params import SamplingParams
from ..model import XLSTMForCausalLM

logger = logging.getLogger(__name__)
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)


class OursStack:
    name = "fast-xlstm"

    def __init__(self, model: XLSTMForCausalLM, *, max_batch: int, state_dtype: torch.dtype,
                 compile_decode: bool = False):
        """compile_decode: torch.compile the decode step and the prefill regions (bench `--compile`)."""
        from ..engine.runner import DecodeMode, ModelRunner

        self.model, self.device = model, model.device
        self.runner = ModelRunner(model, num_slots=max_batch, state_dtype=state_dtype,
                                  compile_decode=compile_decode, compile_prefill=compile_decode)
        self.mode = DecodeMode.of([GREEDY])
        self.state_dtype = state_dtype

    def prefill(self, prompts: torch.Tensor) -> list[int]:
        """Prompts [B, P] into slots 0..B-1 from the empty state; returns the first tokens."""
        slots = list(range(prompts.shape[0]))
        for s in slots:
            self.runner.start_request(s, [], GREEDY, seed=0)
        return self.runner.prefill(slots, prompts.tolist(), [True] * len(slots), [GREEDY] * len(slots)).tokens

    def decode(self, batch: int, steps: int) -> None:
        """`steps` decode steps of slots 0..batch-1, each step's tokens read on the host one step late."""
        slots = list(range(batch))
        pending = None
        for _ in range(steps):
            launched = self.runner.decode_launch(slots, self.mode)
            if pending is not None:
                self.runner.decode_collect(pending)
            pending = launched
        if pending is not None:
            self.runner.decode_collect(pending)

    @torch.inference_mode()
    def forward_tokens(self, ids: torch.Tensor) -> None:
        """A prefill forward over [B, S] tokens (head at the last positions, as prefill needs)."""
        self.model(ids, last_logits_only=True)


def _read_tokens(host: torch.Tensor, event: "torch.cuda.Event | None") -> list[int]:
    """A step's tokens copied to `host`, once the copy queued before `event` has landed."""
    if event is not None:
        event.synchronize()
    return host.view(-1).tolist()


class OfficialStack:
    name = "xlstm (official)"

    def __init__(self, model: XLSTMForCausalLM, *, max_batch: int, state_dtype: torch.dtype, **_: object):
        from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

        c: XLSTMConfig = model.config
        cuda = model.device.type == "cuda"
        cfg = xLSTMLargeConfig(
            embedding_dim=c.embedding_dim, num_heads=c.num_heads, num_blocks=c.num_blocks, vocab_size=c.vocab_size,
            use_bias=c.use_bias, norm_eps=c.norm_eps, norm_reduction_force_float32=c.norm_reduction_force_float32,
            add_out_norm=c.add_out_norm, qk_dim_factor=c.qk_dim_factor, v_dim_factor=c.v_dim_factor,
            ffn_proj_factor=c.ffn_proj_factor, ffn_round_up_to_multiple_of=c.ffn_round_up_to_multiple_of,
            gate_soft_cap=c.gate_soft_cap, output_logit_soft_cap=c.output_logit_soft_cap, eps=c.eps,
            chunkwise_kernel="chunkwise--triton_limit_chunk" if cuda else "chunkwise--native_autograd",
            sequence_kernel="native_sequence__triton" if cuda else "native_sequence__native",
            step_kernel="triton" if cuda else "native", mode="inference", chunk_size=64, return_last_states=True,
            autocast_kernel_dtype="bfloat16", inference_state_dtype="float32" if state_dtype == torch.float32
            else "bfloat16", weight_mode="fused")
        with torch.device("meta"):
            ref = xLSTMLarge(cfg)
        sd = {}
        for key, t in model.state_dict().items():  # our (possibly fused) weights -> their fused keys
            key = key.replace("backbone.embeddings.", "embedding.")
            sd[key] = t.to(model.dtype)
        ref.load_state_dict(sd, assign=True, strict=True)
        self.model, self.device = ref.eval(), model.device
        self.max_batch = max_batch
        self._graphs: dict[int, tuple] = {}
        self.state: dict | None = None

    @torch.inference_mode()
    def prefill(self, prompts: torch.Tensor) -> list[int]:
        # The old states and the graphs that read them go first: alive through the forward, they
        # sat beside the new states and this forward's logits (fp32 at every position, 6.6 GB at
        # 256 x 128), and the decode-batch sweep ran out of memory at batch 256.
        self.state, self._graphs = None, {}
        logits, self.state = self.model(prompts.to(self.device))
        self._last = logits[:, -1].argmax(-1)
        return self._last.tolist()

    def _graph(self, batch: int):
        if batch in self._graphs:
            return self._graphs[batch]
        x = self._last[:batch].view(batch, 1).clone()
        # The harness prefills exactly `batch` rows before decoding them: use that state as is (a
        # copy of 256 states would need another 34 GB).
        state = {i: tuple(t if t.shape[0] == batch else t[:batch].clone() for t in s) for i, s in self.state.items()}

        def body():
            logits, _ = self.model(x, state)  # updates `state` in place
            x.copy_(logits[:, -1:].argmax(-1))

        if self.device.type != "cuda":
            self._graphs[batch] = (body, x)
            return self._graphs[batch]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        self._graphs[batch] = (g.replay, x)
        return self._graphs[batch]

    @torch.inference_mode()
    def decode(self, batch: int, steps: int) -> None:
        """`steps` graph replays; the host reads each step's tokens one step late (see the module
        docstring): a copy to pinned memory queued after each replay, waited for after the next."""
        run, x = self._graph(batch)
        cuda = self.device.type == "cuda"
        host = [torch.empty(x.shape, dtype=x.dtype, pin_memory=cuda) for _ in range(2)]
        pending = None
        for step in range(steps):
            run()
            buf = host[step % 2]
            buf.copy_(x, non_blocking=cuda)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            if pending is not None:
                _read_tokens(*pending)
            pending = (buf, event)
        if pending is not None:
            _read_tokens(*pending)

    @torch.inference_mode()
    def forward_tokens(self, ids: torch.Tensor) -> None:
        self.state, self._graphs = None, {}  # drop the decode runs' states (34 GB at batch 256)
        self.model(ids)
