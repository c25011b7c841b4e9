"""Served-style prefill packs on the GPU: the runner's in-pool prefill (device-table kernels reading and
writing the state-pool rows, one forward) against the grouped prefill (states copied out of the pool
and back, packs split into groups bounded by `prefill_state_bytes`), same process, same weights.

Packs as a server's step makes them: `count` prompts of `length` tokens each, from slots with
non-empty states (7B shape, random bf16 weights, fp32 state, eager block regions). Reports the
median ms per pack and tokens/s for both paths, and checks both gave the same greedy tokens.

    python bench/prefill_in_pool.py --packs 32x512,8x2048,64x256 --out bench/results/prefill_in_pool.json
    python bench/prefill_in_pool.py --model xlstm-tiny --packs 3x20 --slots 4   # plumbing check (CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fast_xlstm.bench.report import save_json, script_result
from fast_xlstm.config import get_preset
from fast_xlstm.engine.runner import ModelRunner
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def parse_packs(text: str) -> list[tuple[int, int]]:
    """"32x512,8x2048" -> [(32, 512), (8, 2048)] (prompts x tokens each)."""
    packs = []
    for part in text.split(","):
        count, _, length = part.partition("x")
        if not count.isdigit() or not length.isdigit() or int(count) < 1 or int(length) < 1:
            raise SystemExit(f"--packs: expected COUNTxLENGTH items like 32x512, got {part!r}")
        packs.append((int(count), int(length)))
    return packs


def time_pack(runner: ModelRunner, pieces: list[list[int]], repeat: int, sync) -> tuple[float, list[int]]:
    """Median ms of runner.prefill over `pieces` (slots 0..n-1, each call from the same start states)."""
    slots = list(range(len(pieces)))
    times, tokens = [], []
    for r in range(repeat + 1):  # the first call warms up (kernel compiles, autotuning)
        runner.pool.reset(slots)
        sync()
        t0 = time.perf_counter()
        tokens = runner.prefill(slots, pieces, [True] * len(slots), [GREEDY] * len(slots)).tokens
        sync()
        if r:
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), tokens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--packs", default="32x512,8x2048,64x256")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    packs = parse_packs(args.packs)
    if max(c for c, _ in packs) > args.slots:
        raise SystemExit(f"--slots {args.slots} is fewer than the largest pack's prompts")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = XLSTMForCausalLM.from_config(get_preset(args.model), dtype=torch.bfloat16 if cuda else torch.float32,
                                         device=device)
    model.fuse_projections()
    g = torch.Generator().manual_seed(0)
    runners = {}
    for name, in_pool in (("in_pool", True), ("grouped", False)):
        if in_pool and not ModelRunner(model, num_slots=1).prefill_in_pool:
            print("[prefill_in_pool] the in-pool path needs the Triton kernels: skipped", flush=True)
            continue
        runners[name] = ModelRunner(model, num_slots=args.slots, max_graph_prefill_tokens=0, prefill_in_pool=in_pool)
    rows = []
    for count, length in packs:
        pieces = [torch.randint(1, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(count)]
        row = {"prompts": count, "tokens_each": length, "tokens": count * length}
        tokens = {}
        for name, runner in runners.items():
            ms, tokens[name] = time_pack(runner, pieces, args.repeat, sync)
            row[f"{name}_ms"] = ms
            row[f"{name}_tok_s"] = count * length / ms * 1e3
            print(f"[prefill_in_pool] {count}x{length}: {name} {ms:.1f} ms ({row[f'{name}_tok_s']:,.0f} tok/s)",
                  flush=True)
        if len(tokens) == 2:
            row["same_greedy_tokens"] = tokens["in_pool"] == tokens["grouped"]
            row["speedup_in_pool"] = row["grouped_ms"] / row["in_pool_ms"]
        rows.append(row)
    print(json.dumps(rows, indent=1))
    save_json(args.out, script_result("prefill_in_pool", args.model, device, weights="bfloat16" if cuda else "float32",
                                      state="float32", prefill_state_bytes=runners["grouped"].prefill_state_bytes,
                                      rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
