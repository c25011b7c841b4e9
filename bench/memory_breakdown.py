"""What the bytes above the weights are at the peak of batch-1 generation (7B shape, random weights).

Builds the model, then records the allocator's history while the bench's batch-1 memory run
happens (a 256-slot stack built and dropped first as in `fast-xlstm bench`, then a 1-slot runner, prefill of one token, N decode steps), replays the trace to find the
moment of peak allocation and lists the allocations live at that moment, grouped by the first
frame inside fast_xlstm (or torch, when none) that made them.

    python bench/memory_breakdown.py [--steps 64] [--no-compile] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gc
import json
from collections import defaultdict

import torch

from fast_xlstm.bench.stacks import OursStack
from fast_xlstm.bench.timing import reset_peak
from fast_xlstm.config import get_preset
from fast_xlstm.model import XLSTMForCausalLM


def origin(frames: list[dict]) -> str:
    """The innermost frame in our package, else the innermost Python frame with a file name."""
    py = [f for f in frames if f.get("filename", "").endswith(".py")]
    for f in py:
        if "fast_xlstm" in f["filename"]:
            return f"{f['filename'].split('fast_xlstm/')[-1]}:{f['line']} {f['name']}"
    return f"{py[0]['filename'].split('site-packages/')[-1]}:{py[0]['line']} {py[0]['name']}" if py else "?"


def live_at_peak(trace: list[dict], start: int) -> tuple[int, dict[int, dict]]:
    """Replays alloc/free events: (peak bytes live at or after event `start`, allocations live then)."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: dict[int, dict] = {}
    for n, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if n >= start and cur > peak:
                peak, at_peak = cur, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    return peak, at_peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="xlstm-7b")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--throwaway", type=int, default=256, help="slots of a stack built and dropped first (0: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
    model = XLSTMForCausalLM.from_config(get_preset(args.preset), dtype=torch.bfloat16, device=dev).fuse_projections()
    weights = torch.cuda.memory_allocated(dev)
    if args.throwaway:  # as `fast-xlstm bench`: a big stack is built (and dropped) before the memory run
        OursStack(model, max_batch=args.throwaway, state_dtype=torch.float32, compile_decode=not args.no_compile)
    gc.collect()
    reset_peak(dev)
    before = torch.cuda.memory_allocated(dev)
    start = sum(len(t) for t in torch.cuda.memory._snapshot()["device_traces"])
    stack = OursStack(model, max_batch=1, state_dtype=torch.float32, compile_decode=not args.no_compile)
    stack.prefill(torch.zeros(1, 1, dtype=torch.long, device=dev))
    stack.decode(1, args.steps)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_alloc = torch.cuda.max_memory_allocated(dev)
    trace = [ev for t in snap["device_traces"] for ev in t]
    peak, live = live_at_peak(trace, start)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[f"stream {ev.get('stream', 0)}: {origin(ev.get('frames', []))}"]
        g[0] += ev["size"]
        g[1] += 1
    rows = sorted(({"where": k, "mb": v[0] / 1e6, "count": v[1]} for k, v in groups.items()), key=lambda r: -r["mb"])
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "weights_gb": weights / 1e9, "allocated_before_gb": before / 1e9, "peak_allocated_gb": peak_alloc / 1e9,
              "peak_mb_from_trace": peak / 1e6, "live_at_peak": rows,
              "reserved_gb": torch.cuda.memory_reserved(dev) / 1e9}
    print(f"after the model {weights / 1e9:.4f} GB; allocated before the stack {before / 1e9:.4f} GB, peak {peak_alloc / 1e9:.4f} GB "
          f"(+{(peak_alloc - before) / 1e6:.1f} MB; trace replay peak {peak / 1e6:.1f} MB)")
    for r in rows[:20]:
        print(f"  {r['mb']:9.2f} MB  x{r['count']:<4d} {r['where']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
