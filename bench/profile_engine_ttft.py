"""Where the engine's time to first token goes on a prefix-cache hit (7B shape, random weights).

Prompts share a 2,048-token prefix and add 64 own tokens; the cache holds the prefix's state, so
each request restores it and prefills 64 tokens. For each request: wall time from `add_request`
to the first token, and the part spent in the runner's prefill (device work included). Then the
same requests under cProfile, whose table shows the host functions that cost the rest.

    python bench/profile_engine_ttft.py [--requests 8] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import threading

import torch
from engine_ttft import first_token_ms  # (bench/ is the script's folder)

from fast_xlstm.config import get_preset
from fast_xlstm.engine import LLMEngine
from fast_xlstm.model import XLSTMForCausalLM


def one_request(engine: LLMEngine, prompt: list[int]) -> tuple[float, float]:
    """(ms to the first token, ms of it inside runner.prefill)."""
    prefill0 = engine.stats["prefill_time"]
    first = first_token_ms(engine, prompt, max_tokens=1)
    return first, 1e3 * (engine.stats["prefill_time"] - prefill0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="xlstm-7b")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--shared", type=int, default=2048)
    ap.add_argument("--own", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = get_preset(args.preset)
    model = XLSTMForCausalLM.from_config(cfg, dtype=torch.bfloat16, device="cuda").fuse_projections()
    engine = LLMEngine(model, None, max_num_seqs=8, compile_decode=True, compile_prefill=True)
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, cfg.vocab_size, (args.shared,), generator=g).tolist()

    def prompt() -> list[int]:
        return prefix + torch.randint(1, cfg.vocab_size, (args.own,), generator=g).tolist()

    for _ in range(3):  # fills the cache, captures the graphs
        one_request(engine, prompt())
    rows = [one_request(engine, prompt()) for _ in range(args.requests)]
    ttft = statistics.median(r[0] for r in rows)
    prefill = statistics.median(r[1] for r in rows)
    print(f"engine TTFT on a prefix hit: median {ttft:.2f} ms, of which runner.prefill {prefill:.2f} ms "
          f"({engine.prefix_cache.stats.hits} cache hits)")
    # The server steps the engine in a thread of its own: the same requests from a second thread.
    in_thread: list[tuple[float, float]] = []
    worker = threading.Thread(target=lambda: in_thread.extend(one_request(engine, prompt())
                                                              for _ in range(args.requests)))
    worker.start()
    worker.join()
    print(f"the same from a second thread: median {statistics.median(r[0] for r in in_thread):.2f} ms, "
          f"runner.prefill {statistics.median(r[1] for r in in_thread):.2f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.requests):
        one_request(engine, prompt())
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    print(buf.getvalue()[:12000])
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(buf.getvalue()[:8000])
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "ttft_ms": [r[0] for r in rows],
                       "prefill_ms": [r[1] for r in rows],
                       "thread_ttft_ms": [r[0] for r in in_thread], "thread_prefill_ms": [r[1] for r in in_thread]}, f, indent=1)


if __name__ == "__main__":
    main()
