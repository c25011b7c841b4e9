"""Where prefill time goes on the GPU: wall time of the model forward vs the runner's prefill, and
a torch.profiler table of the top kernels and host ops (7B shape, random weights)."""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fast_xlstm.config import get_preset
from fast_xlstm.engine.runner import ModelRunner
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM


def timed(fn, n=3):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    preset = sys.argv[1] if len(sys.argv) > 1 else "xlstm-7b"
    m = XLSTMForCausalLM.from_config(get_preset(preset), dtype=torch.bfloat16, device="cuda").fuse_projections()
    runner = ModelRunner(m, num_slots=1)
    greedy = SamplingParams(temperature=0)
    for n in (128, 2048):
        ids = torch.randint(1, m.config.vocab_size, (1, n), device="cuda")
        with torch.inference_mode():
            fwd = timed(lambda: m(ids, last_logits_only=True))
            cu = torch.tensor([0, n], device="cuda")
            packed = timed(lambda: m(ids, cu_seqlens=cu, last_logits_only=True))
        run = timed(lambda: runner.prefill([0], ids.tolist(), [True], [greedy]))
        print(f"prefill {n}: model forward {fwd:.1f} ms, packed forward {packed:.1f} ms, runner {run:.1f} ms")
    ids = torch.randint(1, m.config.vocab_size, (1, 2048), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.prefill([0], ids.tolist(), [True], [greedy])
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
