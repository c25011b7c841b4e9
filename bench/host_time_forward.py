"""Host time of an eager model forward with compiled block regions (7B shape, random weights).

A short prefill outside a CUDA graph can be bound by the host: the kernels' launches, torch.compile's
guard checks and the compiled regions' wrappers. This prints, for three forwards of one prompt, the
time until the host returned and until the GPU finished (equal times: host-bound), then a
torch.profiler table of host time per op (the profiler inflates per-op costs; compare rows, not
totals with the timings above).

    python bench/host_time_forward.py [--preset xlstm-7b] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fast_xlstm.config import get_preset
from fast_xlstm.engine.runner import ModelRunner
from fast_xlstm.model import XLSTMForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="xlstm-7b")
    ap.add_argument("--tokens", type=int, default=2048)
    args = ap.parse_args()
    m = XLSTMForCausalLM.from_config(get_preset(args.preset), dtype=torch.bfloat16, device="cuda")
    m.fuse_projections()
    ModelRunner(m, num_slots=1, compile_decode=False, compile_prefill=True)  # compiles the block regions
    ids = torch.randint(1, m.config.vocab_size, (1, args.tokens), device="cuda")

    def fwd() -> None:
        with torch.inference_mode():
            m(ids, last_logits_only=True)

    for _ in range(3):
        fwd()
    torch.cuda.synchronize()
    for _ in range(3):
        t0 = time.perf_counter()
        fwd()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"host {1e3 * (t1 - t0):.1f} ms, wall {1e3 * (t2 - t0):.1f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
