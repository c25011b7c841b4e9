"""One engine step with both decode and prefill, two ways, on the runner the server uses:

- mixed: one forward, the decoding requests riding as one-token pieces (`LLMEngine(mixed_steps=True)`);
- split: the decode step's CUDA graph, then the prefill forward (the default engine).

Each case is DECODE:COUNTxLENGTH (decoding requests : prompts x tokens each), e.g. 255:1x512 is a
full 256-slot server admitting one 512-token prompt. Reports per case the median wall ms of both
ways, and for the mixed forward the host's launch time (until `prefill_launch` returns; when it is
close to the wall time the step is host-bound). `--profile` adds the mixed forward's device time by
kernel kind and its idle gaps with their causes (`train_mfu.profile_steps`).

    python bench/mixed_step.py --cases 255:1x512,63:1x512,9:1x512,0:1x512 --out bench/results/mixed_step.json
    python bench/mixed_step.py --model xlstm-tiny --cases 3:1x20 --no-compile   # plumbing check (CPU)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fast_xlstm.bench.report import save_json, script_result
from fast_xlstm.config import get_preset
from fast_xlstm.engine.runner import DecodeMode, ModelRunner
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    """"255:1x512,0:8x2048" -> [(255, 1, 512), (0, 8, 2048)] (decode rows, prompts, tokens each)."""
    cases = []
    for part in text.split(","):
        dec, _, pack = part.strip().partition(":")
        count, _, length = pack.partition("x")
        if not (dec.isdigit() and count.isdigit() and length.isdigit()) or int(count) < 1 or int(length) < 1:
            raise SystemExit(f"--cases: expected DECODE:COUNTxLENGTH items like 255:1x512, got {part!r}")
        cases.append((int(dec), int(count), int(length)))
    return cases


def bench_runner(model_name: str, num_slots: int, compile: bool, **runner_kwargs) -> tuple[ModelRunner, Callable]:
    """A `ModelRunner` on a preset with random weights (bf16 on CUDA, fp32 on CPU) and fused projections,
    compiled or not, and the device sync (a no-op on CPU)."""
    cuda = torch.cuda.is_available()
    model = XLSTMForCausalLM.from_config(get_preset(model_name), dtype=torch.bfloat16 if cuda else torch.float32,
                                         device="cuda" if cuda else "cpu", seed=0).fuse_projections()
    runner = ModelRunner(model, num_slots=num_slots, compile_decode=compile, compile_prefill=compile, **runner_kwargs)
    return runner, torch.cuda.synchronize if cuda else (lambda: None)


def timed_runs(fn: Callable, reset: Callable[[], None], sync: Callable[[], None], repeat: int) -> tuple[list, list]:
    """Wall ms of `repeat` calls of fn after two warm-ups (kernel specializations, graph captures), each
    from `reset()` and between device syncs; and what each call returned."""
    walls, returned = [], []
    for r in range(repeat + 2):
        reset()
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        if r >= 2:
            walls.append(1e3 * (time.perf_counter() - t0))
            returned.append(out)
    return walls, returned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--cases", default="255:1x512,127:1x512,63:1x512,9:1x512,0:1x512,255:4x512,63:4x512")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager block regions (the server's --compile off)")
    ap.add_argument("--max-graph-prefill-tokens", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="profile the mixed forward of each case")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    runner, sync = bench_runner(args.model, max(d + c for d, c, _ in cases), not args.no_compile,
                                max_graph_prefill_tokens=args.max_graph_prefill_tokens)
    model, device = runner.model, runner.device.type
    cuda = device == "cuda"
    mode = DecodeMode.of([GREEDY])
    g = torch.Generator().manual_seed(0)
    rows = []
    for dec, count, length in cases:
        pieces = [torch.randint(1, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(count)]
        dec_slots, pre_slots = list(range(dec)), list(range(dec, dec + count))
        last = [True] * (dec + count)
        params = [GREEDY] * (dec + count)

        def mixed() -> float:
            t0 = time.perf_counter()
            pending = runner.prefill_launch(dec_slots + pre_slots, [None] * dec + pieces, last, params)
            host = time.perf_counter() - t0
            runner.prefill_collect(pending)
            return host

        def split() -> None:
            if dec_slots:
                runner.decode(dec_slots, mode)
            runner.prefill(pre_slots, pieces, [True] * count, [GREEDY] * count)

        row = {"decode_rows": dec, "prompts": count, "tokens_each": length}
        for name, fn in (("mixed", mixed), ("split", split)):
            walls, hosts = timed_runs(fn, lambda: runner.pool.reset(dec_slots + pre_slots), sync, args.repeat)
            row[f"{name}_ms"] = statistics.median(walls)
            if name == "mixed":
                row["mixed_host_launch_ms"] = 1e3 * statistics.median(hosts)
        row["split_over_mixed"] = row["split_ms"] / row["mixed_ms"]
        if args.profile and cuda:
            import sys

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from train_mfu import profile_steps

            row["mixed_profile"] = profile_steps(mixed, sync, steps=1)
        print(f"[mixed_step] {dec}:{count}x{length}: mixed {row['mixed_ms']:.1f} ms (host launch "
              f"{row['mixed_host_launch_ms']:.1f}), split {row['split_ms']:.1f} ms", flush=True)
        rows.append(row)
    save_json(args.out, script_result("mixed_step", args.model, device, compiled_regions=not args.no_compile,
                                      state="float32", rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
