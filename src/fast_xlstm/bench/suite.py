"""The measurements of `fast-xlstm bench`, run for each stack in one process on one device.

Each measurement returns plain dicts (one row per point) with the time, tok/s and the achieved
memory bandwidth (decode) or matrix throughput (prefill), so rows compare across stacks directly.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

import torch

from .timing import matmul_params, peak_bytes, reset_peak, sync, wall, weight_bytes

logger = logging.getLogger(__name__)


@dataclass
class SuiteSizes:
    ttft_prompts: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192, 16384])
    decode_prompts: list[int] = field(default_factory=lambda: [128, 2048, 16384])
    decode_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    prefill_shapes: list[tuple[int, int]] = field(
        default_factory=lambda: [(32, 2048), (16, 4096), (8, 8192), (4, 16384), (2, 32768)])
    memory_lengths: list[int] = field(default_factory=lambda: [64, 256, 1024, 4096, 16384])
    decode_steps: int = 64

    @classmethod
    def quick(cls) -> "SuiteSizes":
        return cls([8, 32], [8, 32], [1, 2, 4], [(2, 16), (1, 32)], [4, 16], decode_steps=4)


def _ids(shape: tuple[int, ...], vocab: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(1, vocab, shape, generator=g).to(device)


def _state_bytes(model, dtype: torch.dtype) -> int:
    return model.config.state_numel_per_sequence() * torch.empty(0, dtype=dtype).element_size()


SECTIONS = ("ttft", "decode_after_prompt", "decode_batch", "prefill", "memory")


def _free_after_oom(dev: torch.device) -> None:
    """Returns what a failed measurement left in the allocator's cache (its exception's frames are gone)."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(make_stack, model, sizes: SuiteSizes, state_dtype: torch.dtype,
              sections: tuple[str, ...] = SECTIONS) -> dict[str, list[dict]]:
    """The measurements in `sections` for one stack; `make_stack(max_batch)` builds it (sized per
    measurement, so the batch-1 memory run holds one sequence's state, not a 256-slot pool).
    `model` is our model, for sizes and roofline counts."""
    dev, vocab = model.device, model.config.vocab_size
    wbytes, mparams = weight_bytes(model), matmul_params(model)
    sbytes = _state_bytes(model, state_dtype)
    out: dict[str, list[dict]] = {"ttft": [], "decode_after_prompt": [], "decode_batch": [], "prefill": [],
                                  "memory": []}
    stack = make_stack(max(sizes.decode_batches + [b for b, _ in sizes.prefill_shapes]))

    for p in sizes.ttft_prompts if "ttft" in sections else ():
        ids = _ids((1, p), vocab, dev, seed=p)
        t = wall(lambda: stack.prefill(ids), dev, warmup=1, repeat=3)
        out["ttft"].append({"prompt": p, "ms": 1e3 * t, "prefill_tok_s": p / t,
                            "tflops": 2 * mparams * p / t / 1e12})
        logger.info("%s ttft %d: %.1f ms", stack.name, p, 1e3 * t)

    steps = sizes.decode_steps
    for p in sizes.decode_prompts if "decode_after_prompt" in sections else ():
        stack.prefill(_ids((1, p), vocab, dev, seed=p))
        stack.decode(1, 2)  # capture/warm
        t = wall(lambda: stack.decode(1, steps), dev, warmup=0, repeat=3)
        out["decode_after_prompt"].append({"prompt": p, "tok_s": steps / t, "ms_per_token": 1e3 * t / steps,
                                           "gb_s": (wbytes + 2 * sbytes) * steps / t / 1e9})

    # A point that runs out of memory (the official stack's prefill keeps fp32 logits of every
    # position: 6.6 GB at 256 x 128) is recorded as such and the rest still run.
    for b in sizes.decode_batches if "decode_batch" in sections else ():
        try:
            stack.prefill(_ids((b, 128), vocab, dev, seed=b))
            stack.decode(b, 2)
            t = wall(lambda: stack.decode(b, steps), dev, warmup=0, repeat=3)
        except torch.OutOfMemoryError:
            out["decode_batch"].append({"batch": b, "error": "out of memory"})
            _free_after_oom(dev)
            continue
        out["decode_batch"].append({"batch": b, "tok_s": b * steps / t, "ms_per_step": 1e3 * t / steps,
                                    "gb_s": (wbytes + 2 * b * sbytes) * steps / t / 1e9})
        logger.info("%s decode batch %d: %.0f tok/s", stack.name, b, b * steps / t)

    for b, ctx in sizes.prefill_shapes if "prefill" in sections else ():
        ids = _ids((b, ctx), vocab, dev, seed=ctx)
        try:
            t = wall(lambda: stack.forward_tokens(ids), dev, warmup=1, repeat=2)
        except torch.OutOfMemoryError:
            out["prefill"].append({"batch": b, "context": ctx, "error": "out of memory"})
            _free_after_oom(dev)
            continue
        out["prefill"].append({"batch": b, "context": ctx, "tok_s": b * ctx / t, "ms": 1e3 * t,
                               "tflops": 2 * mparams * b * ctx / t / 1e12})

    if "memory" not in sections:
        return out
    # Peak memory while generating from the BOS token, at growing generated lengths (one run). The
    # first token also builds the step (compile, autotune, graph capture): its peak is kept apart
    # (`warmup_peak_gb`), since inductor's autotuning zeroes an L2-sized scratch buffer (~50 MB on
    # an H100) that generation never holds, and a warm compile cache skips it.
    del stack
    gc.collect()
    reset_peak(dev)
    base = torch.cuda.memory_allocated(dev) / 1e9 if dev.type == "cuda" else 0.0
    stack = make_stack(1)
    stack.prefill(torch.zeros(1, 1, dtype=torch.long, device=dev))
    stack.decode(1, 1)
    sync(dev)
    warmup_peak = (peak_bytes(dev) or 0) / 1e9
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    done, t0 = 1, time.perf_counter()
    for n in sorted(sizes.memory_lengths):
        stack.decode(1, n - done)
        done = n
        sync(dev)
        out["memory"].append({"generated": n, "peak_gb": (peak_bytes(dev) or 0) / 1e9, "allocated_before_gb": base,
                              "warmup_peak_gb": warmup_peak, "weights_gb": wbytes / 1e9,
                              "seconds": time.perf_counter() - t0})
    return out
