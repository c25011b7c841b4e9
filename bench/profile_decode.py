"""Where a decode step's and a short prefill's GPU time goes (7B shape, random weights).

For each batch size: the runner's CUDA-graph decode step is timed (median of replays), then 10
steps are profiled with torch.profiler, and the kernels (graph replays included) are summed per
name and per kind (GEMM, mLSTM step, other) as microseconds per step, next to the bytes the step
must move (weights + state read and write) and the GB/s that implies. With `--prefill N`, the
same for the runner's graph prefill of one N-token prompt (the prefix-cache hit path). With
`--forward BxS`, the same for a model forward over B sequences of S tokens (the benchmark's prefill:
compiled block regions, head at the last positions), with the GEMMs' achieved TFLOP/s.

    python bench/profile_decode.py [--batches 1 64] [--prefill 64] [--forward 4x16384] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fast_xlstm.config import get_preset
from fast_xlstm.engine.runner import DecodeMode, ModelRunner
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 30, ignore_eos=True)


def kind_of(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "gemv", "nvjet", "cutlass", "sm90_", "splitk", "cublas")):
        return "gemm"
    if "step_kernel" in n or "step_slots" in n or "mlstm_step" in n:
        return "mlstm_step"
    if "chunk" in n or "mlstm" in n or "_fwd_states" in n or "_fwd_out" in n:
        return "mlstm_chunkwise"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if n.startswith("triton_"):
        return "compiled_glue"
    return "other"


def kernel_table(prof, steps: int) -> dict:
    """Kernel microseconds per step, by name (top 25) and by kind."""
    by_name: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            by_name[e.name] += e.device_time_total / steps if hasattr(e, "device_time_total") else e.cuda_time / steps
            count[e.name] += 1
    by_kind: dict[str, float] = defaultdict(float)
    for n, us in by_name.items():
        by_kind[kind_of(n)] += us
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    sequence = [f"{e.name[:70]} {e.time_range.elapsed_us():.1f}us" for e in kernels[:48]]
    return {"sequence": sequence, "total_us": sum(by_name.values()), "by_kind_us": dict(by_kind),
            "kernels_per_step": sum(count.values()) / steps,
            "top": [{"name": n[:120], "us": us, "calls_per_step": count[n] / steps} for n, us in top]}


def print_kernels(head: str, row: dict) -> None:
    """One line of totals per kind, then the top kernels of a `kernel_table` row."""
    kinds = sorted(row["by_kind_us"].items(), key=lambda kv: -kv[1])
    print(f"{head}; kernels {row['total_us']:.0f} us in {row['kernels_per_step']:.0f} launches; by kind "
          + ", ".join(f"{k} {v:.0f}" for k, v in kinds))
    for t in row["top"][:12]:
        print(f"   {t['us']:8.1f} us  x{t['calls_per_step']:5.1f}  {t['name']}")


def replay_ms(fn, n: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="xlstm-7b")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--prefill", type=int, nargs="*", default=[64])
    ap.add_argument("--forward", nargs="*", default=[], help="BxS model forwards to profile, e.g. 4x16384")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the decode step")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    model = XLSTMForCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda").fuse_projections()
    wbytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    # Decode reads B rows of the embedding table, not the table (unless the head shares it).
    emb_bytes = 0 if cfg.tie_word_embeddings else model.backbone.embeddings.weight.numel() * 2
    sbytes = cfg.state_numel_per_sequence() * 4
    compiled = not args.no_compile
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compiled": compiled,
                    "decode": [], "prefill": [], "forward": []}
    mode = DecodeMode.of([GREEDY])
    runner = ModelRunner(model, num_slots=max(args.batches), compile_decode=compiled, compile_prefill=compiled,
                         compile_mode=args.compile_mode)
    report["compile_mode"] = args.compile_mode
    for b in args.batches:
        slots = list(range(b))
        for s in slots:
            runner.start_request(s, [], GREEDY, seed=0)
        ids = torch.randint(1, cfg.vocab_size, (b, 128)).tolist()
        for a in range(0, b, 8):
            runner.prefill(slots[a:a + 8], ids[a:a + 8], [True] * len(ids[a:a + 8]), [GREEDY] * len(ids[a:a + 8]))
        runner.decode(slots, mode)
        ms = replay_ms(lambda s=slots: runner.decode(s, mode))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                runner.decode(slots, mode)
            torch.cuda.synchronize()
        moved = wbytes - emb_bytes + 2 * b * sbytes
        row = {"batch": b, "ms_per_step": ms, "tok_s": 1e3 * b / ms, "bytes_per_step": moved,
               "gb_s": moved / ms / 1e6, **kernel_table(prof, 10)}
        report["decode"].append(row)
        print_kernels(f"decode B{b}: {ms:.3f} ms/step ({row['tok_s']:.0f} tok/s), {row['gb_s']:.0f} GB/s", row)
        print("   first kernels of a step, in order: " + " | ".join(row["sequence"][:30]))
    for n in args.prefill:
        runner.start_request(0, [], GREEDY, seed=0)
        ids = torch.randint(1, cfg.vocab_size, (n,)).tolist()

        def one(ids: list[int] = ids) -> None:
            runner.prefill([0], [ids], [True], [GREEDY])

        ms = replay_ms(one, 10)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                one()
            torch.cuda.synchronize()
        row = {"tokens": n, "ms": ms, **kernel_table(prof, 5)}
        report["prefill"].append(row)
        print_kernels(f"prefill {n} tokens: {ms:.2f} ms wall", row)
    # Projection FLOPs per token: every block weight but the norms (the head runs at last positions only).
    block_params = sum(p.numel() for blk in model.backbone.blocks for p in blk.parameters() if p.dim() == 2)
    for spec in args.forward:
        b, _, s = spec.partition("x")
        ids = torch.randint(1, cfg.vocab_size, (int(b), int(s)), device="cuda")

        def fwd(ids: torch.Tensor = ids) -> None:
            with torch.inference_mode():
                model(ids, last_logits_only=True)

        ms = replay_ms(fwd, 3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        row = {"forward": spec, "tokens": ids.numel(), "ms": ms, "tok_s": ids.numel() / ms * 1e3,
               **kernel_table(prof, 1)}
        gemm_us = row["by_kind_us"].get("gemm", 0.0)
        row["gemm_tflop_s"] = 2 * block_params * ids.numel() / (gemm_us * 1e-6) / 1e12 if gemm_us else None
        report["forward"].append(row)
        print_kernels(f"forward {spec}: {ms:.1f} ms wall ({row['tok_s']:,.0f} tok/s), GEMMs at "
                      f"{row['gemm_tflop_s'] or 0:.0f} TFLOP/s", row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
