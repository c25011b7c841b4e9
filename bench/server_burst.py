"""Garbage-collector pauses and engine steps while a burst of streaming requests arrives (in-process server).

Builds the model as `fast-xlstm serve` does (`LLM(preset)`), serves it with uvicorn in this process,
sends a warm-up load, then (with `--freeze`, as `fast-xlstm serve` does before it listens) collects and
freezes the heap, then sends `--reps` bursts of CONCURRENCY streaming completions from a client
process (`bench/load.py`). For each burst: the load's summary line, the engine steps' count and
longest duration, and the cyclic collector's passes per generation with their summed pause (the
pauses hold the GIL, which the engine thread's steps need while requests arrive).

    python bench/server_burst.py [--model xlstm-tiny] [--freeze] [--concurrency 64] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

import uvicorn

from fast_xlstm.llm import LLM
from fast_xlstm.server.api import create_app
from fast_xlstm.server.config import ServerConfig


class GCPauses:
    """Records (generation, seconds) of every collection through `gc.callbacks`."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def by_generation(self) -> dict[int, dict[str, float]]:
        return {g: {"passes": sum(1 for x, _ in self.pauses if x == g),
                    "ms": round(1e3 * sum(d for x, d in self.pauses if x == g), 2)} for g in (0, 1, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="xlstm-tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--freeze", action="store_true", help="gc.collect() + gc.freeze() after the warm-up load")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--port", type=int, default=8179)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, max_num_seqs=max(8, args.concurrency))
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(model_names=["m"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    steps: list[float] = []
    engine_step = llm.engine.step

    def timed_step(*a, **kw):
        t0 = time.perf_counter()
        out = engine_step(*a, **kw)
        steps.append(time.perf_counter() - t0)
        return out
    llm.engine.step = timed_step
    pauses = GCPauses()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load.py")

    def burst(n: int, out_tokens: int) -> str:
        cmd = [sys.executable, script, "--base-url", f"http://127.0.0.1:{args.port}/v1", "--concurrency", str(n),
               "--num-requests", str(n), "--prompt-tokens", str(args.prompt_tokens), "--output-tokens",
               str(out_tokens), "--vocab-size", str(llm.model.config.vocab_size), "--logprobs"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    rows = []

    def driver() -> None:
        try:
            while not server.started:
                time.sleep(0.05)
            burst(8, 4)  # warm-up: first-use allocations and imports
            if args.freeze:
                gc.collect()
                gc.freeze()
            for rep in range(args.reps):
                steps.clear()
                pauses.pauses.clear()
                out = burst(args.concurrency, args.output_tokens)
                summary = next(line for line in out.splitlines() if line.startswith("requests:"))
                row = {"rep": rep, "load": summary, "steps": len(steps), "longest_step_ms": round(1e3 * max(steps), 1),
                       "gc": pauses.by_generation()}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.should_exit = True

    threading.Thread(target=driver, daemon=True).start()
    server.run()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": args.model, "device": str(llm.model.device), "freeze": args.freeze,
                       "concurrency": args.concurrency, "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
