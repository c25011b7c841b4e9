"""Prefill latency on the GPU without HTTP in the way (7B shape, random bf16 weights, fp32 state).

1. The runner's prefill of one prompt of 16 .. 2048 tokens: eager packed path against the
   device-table path replayed from CUDA graphs (same process, same weights), with and without the
   regional torch.compile of the blocks.
2. The engine's time to first token for prompts of a shared 2,048-token prefix plus 64 own tokens,
   prefix cache off vs on (the engine-level form of the server benchmark's cache test).

Writes JSON (with the commit, the card and torch) to --out.
Usage: python bench/engine_ttft.py --out bench/results/h100-engine/engine_ttft.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fast_xlstm.config import get_preset
from fast_xlstm.engine import LLMEngine
from fast_xlstm.engine.runner import ModelRunner, compile_prefill_regions
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM

GREEDY = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ms(fn, repeat: int) -> float:
    """Median wall milliseconds of fn() (each call ends with a host sync: it returns tokens)."""
    fn()  # warm-up (captures the graph on the graph path)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def runner_prefill(model, lengths: list[int], repeat: int) -> dict[str, dict[int, float]]:
    vocab = model.config.vocab_size
    out = {}
    for name, max_graph in (("eager", 0), ("graph", 2048)):
        # "eager": the packed forward on copied states (the path before the device-table kernels)
        runner = ModelRunner(model, num_slots=1, max_graph_prefill_tokens=max_graph, prefill_in_pool=False)
        row = {}
        for n in lengths:
            ids = torch.randint(1, vocab, (n,)).tolist()

            def once():
                runner.start_request(0, [], GREEDY, seed=0)
                return runner.prefill([0], [ids], [True], [GREEDY]).tokens
            row[n] = _ms(once, repeat)
            print(f"[engine_ttft] runner {name} prefill {n}: {row[n]:.2f} ms", flush=True)
        out[name] = row
    return out


def first_token_ms(engine: LLMEngine, prompt: list[int], max_tokens: int = 4) -> float:
    """Wall ms from add_request to the request's first token (greedy), stepping the engine until idle."""
    sync()
    t0 = time.perf_counter()
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    first = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and first is None and o.new_token_ids:
                first = 1e3 * (time.perf_counter() - t0)
    return first


def engine_ttft(model, prefix_cache: bool, requests: int, shared: int = 2048, own: int = 64) -> list[float]:
    """TTFT (ms) of `requests` sequential requests sharing a `shared`-token prefix."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, vocab, (shared,), generator=g).tolist()
    engine = LLMEngine(model, None, max_num_seqs=8, enable_prefix_cache=prefix_cache)
    ttfts = []
    for r in range(requests + 1):  # request 0 warms up (and fills the cache)
        prompt = prefix + torch.randint(1, vocab, (own,), generator=g).tolist()
        first = first_token_ms(engine, prompt)
        if r:
            ttfts.append(first)
    print(f"[engine_ttft] engine ttft prefix cache {'on' if prefix_cache else 'off'}: "
          f"median {statistics.median(ttfts):.1f} ms", flush=True)
    return ttfts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--out", default="bench/results/engine_ttft.json")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--lengths", default="16,64,128,512,2048")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="skip the runs with compiled block regions")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a plumbing check only
    model = XLSTMForCausalLM.from_config(get_preset(args.model), dtype=torch.bfloat16, device=device)
    model.fuse_projections()
    result = {"commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"), "model": args.model,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
              "weights": "bfloat16",
              "state": "float32", "lengths": lengths}
    result["runner_prefill_ms"] = {"eager_regions": runner_prefill(model, lengths, args.repeat)}
    result["engine_ttft_ms"] = {"prefix_cache_off": engine_ttft(model, False, args.requests),
                                "prefix_cache_on": engine_ttft(model, True, args.requests)}
    if not args.no_compile:
        compile_prefill_regions(model)
        result["runner_prefill_ms"]["compiled_regions"] = runner_prefill(model, lengths, args.repeat)
        result["engine_ttft_ms_compiled"] = {"prefix_cache_off": engine_ttft(model, False, args.requests),
                                             "prefix_cache_on": engine_ttft(model, True, args.requests)}
    for key in ("engine_ttft_ms", "engine_ttft_ms_compiled"):
        if key in result:
            t = result[key]
            result[key]["ratio_off_over_on_median"] = (statistics.median(t["prefix_cache_off"])
                                                       / statistics.median(t["prefix_cache_on"]))
    for regions, paths in result["runner_prefill_ms"].items():
        paths["speedup_graph_over_eager"] = {n: paths["eager"][n] / paths["graph"][n] for n in lengths}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "lengths"}, indent=2))


if __name__ == "__main__":
    main()
