"""Serving benchmark on one GPU (issue 5), in one run:

1. server throughput at 64 and 256 concurrent requests (512 prompt / 256 output tokens), as a ratio
   to static-batch decode throughput at the same batch size measured in this run;
2. time to first token with a shared 2,048-token system prompt, prefix cache on vs off.

Usage (from the repo root, with the package importable): python bench/serve_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def start_server(out: Path, name: str, port: int, model: str, *extra: str) -> subprocess.Popen:
    log = open(out / f"server-{name}.log", "w")
    cmd = [sys.executable, "-m", "fast_xlstm", "serve", "--model", model, "--port", str(port), "--log-level",
           "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(900):
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited: {(out / f'server-{name}.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"server {name} not ready")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def engine_gauges(port: int) -> dict[str, float]:
    """The engine's step counters from /metrics (steps, busy seconds, prefill and decode seconds)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("fast_xlstm_engine_"):
            out[name.removeprefix("fast_xlstm_engine_")] = float(value)
    return out


def load(out: Path, name: str, port: int, *args: str) -> dict:
    """Runs bench/load.py; adds what the engine did meanwhile (`engine`: steps and seconds busy,
    from /metrics, warm-up requests included) next to the client's wall time."""
    path = out / f"load-{name}.json"
    before, start = engine_gauges(port), time.time()
    subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--base-url", f"http://127.0.0.1:{port}/v1",
                    "--vocab-size", "50304", "--output", str(path), *args], check=True)
    after = engine_gauges(port)
    result = json.loads(path.read_text())
    result["engine"] = {k: after[k] - before.get(k, 0.0) for k in after}
    result["window_unix_s"] = [start, time.time()]  # to find this load's lines in the server's step log
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def static_decode(model: str, batches: list[int], steps: int = 32, prompt: int = 512, output: int = 256
                  ) -> tuple[dict[int, float], dict[int, float]]:
    """Decode tok/s of a static batch through the same runner and settings as the server (compiled
    decode step, CUDA graphs), without the server or the scheduler; and the output tok/s of a whole
    static batch (prefill of `prompt` tokens per sequence, then `output` decode steps)."""
    import torch

    from fast_xlstm.bench.stacks import OursStack
    from fast_xlstm.bench.timing import wall
    from fast_xlstm.config import get_preset
    from fast_xlstm.model import XLSTMForCausalLM

    m = XLSTMForCausalLM.from_config(get_preset(model), dtype=torch.bfloat16, device="cuda", seed=0).fuse_projections()
    out, whole = {}, {}
    stack = OursStack(m, max_batch=max(batches), state_dtype=torch.float32, compile_decode=True)
    for b in batches:
        prompts = torch.randint(1, m.config.vocab_size, (b, prompt), device="cuda")
        t_prefill = wall(lambda: stack.prefill(prompts), m.device, warmup=1, repeat=1)
        stack.decode(b, 2)
        t = wall(lambda: stack.decode(b, steps), m.device, warmup=0, repeat=2)
        out[b] = b * steps / t
        whole[b] = b * output / (t_prefill + output * t / steps)
    return out, whole


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/serve")
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--only-prefix", action="store_true", help="only the shared-prefix TTFT comparison")
    ap.add_argument("--skip-prefix", action="store_true", help="only the throughput runs")
    ap.add_argument("--server-args", default="", help="more `fast-xlstm serve` options for both servers, "
                    "e.g. '--async-scheduling'")
    ap.add_argument("--client-processes", type=int, default=4,
                    help="load generator processes for the throughput runs (one cannot parse 8k chunks/s)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"), "model": args.model}
    # TTFT runs ask for logprobs so the server sends a chunk per token: with random weights many
    # tokens decode to no text, and a text-only stream would time the first visible text instead.
    prefix_args = ("--concurrency", "1", "--num-requests", "48", "--shared-prefix-tokens", "2048", "--prompt-tokens",
                   "64", "--output-tokens", "8", "--warmup", "2", "--logprobs")

    port = 8123
    extra = args.server_args.split()
    result["server_args"] = extra
    srv = start_server(out, "cache-on", port, args.model, "--max-num-seqs", "64" if args.only_prefix else "256",
                       "--compile", "--step-log", str(out / "steps-cache-on.jsonl"), *extra)
    try:
        for c in () if args.only_prefix else (64, 256):
            result[f"concurrency_{c}"] = load(out, f"c{c}", port, "--concurrency", str(c), "--num-requests",
                                              str(max(args.requests, c)), "--prompt-tokens", "512",
                                              "--output-tokens", "256", "--warmup", "4", "--processes",
                                              str(args.client_processes))
        if not args.skip_prefix:
            result["ttft_shared_prefix_cache_on"] = load(out, "prefix-on", port, *prefix_args)
    finally:
        stop(srv)
    if not args.skip_prefix:
        srv = start_server(out, "cache-off", port, args.model, "--max-num-seqs", "8", "--no-prefix-cache", "--compile",
                           *extra)
        try:
            result["ttft_shared_prefix_cache_off"] = load(out, "prefix-off", port, *prefix_args)
        finally:
            stop(srv)
    static, whole = ({}, {}) if args.only_prefix else static_decode(args.model, [64, 256])
    result["static_decode_tok_s"] = static
    result["static_batch_with_prefill_tok_s"] = whole
    for c in () if args.only_prefix else (64, 256):
        served = result[f"concurrency_{c}"]
        tput = served["output_throughput_tok_s"]
        result[f"ratio_served_to_static_{c}"] = tput / static[c] if tput else None
        result[f"ratio_served_to_static_batch_with_prefill_{c}"] = tput / whole[c] if tput else None
    if not args.skip_prefix:
        on = result["ttft_shared_prefix_cache_on"]["ttft_ms"]["p50"]
        off = result["ttft_shared_prefix_cache_off"]["ttft_ms"]["p50"]
        result["ttft_p50_ratio_off_over_on"] = off / on
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict) or k.startswith("static")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
