"""Where a server request's time to first token goes, on a prefix-cache hit (in-process server).

Runs `create_app` under uvicorn in a thread of this process, sends streaming completions whose
prompts share a `--shared`-token prefix plus `--own` tokens (token ids, logprobs on, as the serve
benchmark does), and times each request's phases with wrappers around the engine thread's work:

  send->asgi   request sent -> the app's first middleware has it (client send, socket, HTTP parsing)
  asgi->route  -> the completions route runs (body read, JSON and pydantic validation, dependencies)
  route->put   -> the route hands the engine requests to the engine thread's queue
  put->add     -> the engine thread starts adding them (thread wake-up)
  add          the engine's add_request
  add->step    added -> the engine step that prefills it starts
  step.pre     that step, before the runner's prefill (scheduling, admission, prefix restore)
  step.prefill the runner's prefill (64 tokens from the cached prefix state) and first-token sampling
  step.post    the rest of the step (outputs, detokenizing)
  step->pub    step end -> its outputs handed to the event loop
  pub->client  handed over -> the first SSE event read by the client (SSE encoding, socket)

Same model build as `fast-xlstm serve` (`LLM(preset)`), so the figures match a real server's.

    python bench/profile_server_ttft.py [--model xlstm-7b] [--compile] [--requests 24] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from fast_xlstm.engine import engine as engine_module
from fast_xlstm.engine import runner as runner_module
from fast_xlstm.llm import LLM
from fast_xlstm.server import api, async_engine, limits
from fast_xlstm.server.api import create_app
from fast_xlstm.server.config import ServerConfig

PHASES = ("send->asgi", "asgi->route", "route->put", "put->add", "add", "add->step", "step.pre", "step.prefill",
          "step.post", "step->pub", "pub->client", "ttft")
_events: list[tuple[str, float, float]] = []


def _timed(cls: type, name: str, label: str | None = None) -> None:
    """Wraps cls.name (sync or async) so each call appends (label, start, end) to the event log."""
    inner = getattr(cls, name)
    label = label or name
    if asyncio.iscoroutinefunction(inner):
        async def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            _events.append((label + ".enter", t0, t0))
            out = await inner(*args, **kwargs)
            _events.append((label, t0, time.perf_counter()))
            return out
    else:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            _events.append((label, t0, time.perf_counter()))
            return out

    setattr(cls, name, wrapper)


class _QueueProbe(queue.SimpleQueue):
    """The engine front's command queue, with `put` timed (SimpleQueue's methods cannot be patched)."""


def phases(t_send: float, t_first: float) -> tuple[float, ...]:
    first = {}
    for n in ("asgi.enter", "route.enter", "put", "_add", "step", "prefill", "_publish"):
        first[n] = next(e for e in _events if e[0] == n)
    asgi, route, put, add = first["asgi.enter"], first["route.enter"], first["put"], first["_add"]
    step, prefill, pub = first["step"], first["prefill"], first["_publish"]
    ms = [asgi[1] - t_send, route[1] - asgi[1], put[1] - route[1], add[1] - put[1], add[2] - add[1],
          step[1] - add[2], prefill[1] - step[1], prefill[2] - prefill[1], step[2] - prefill[2],
          pub[2] - step[2], t_first - pub[2], t_first - t_send]
    return tuple(1e3 * x for x in ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--compile", action="store_true", help="as `fast-xlstm serve --compile`")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--shared", type=int, default=2048)
    ap.add_argument("--own", type=int, default=64)
    ap.add_argument("--port", type=int, default=8139)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, max_num_seqs=8, compile_decode=args.compile, compile_prefill=args.compile)
    _timed(engine_module.LLMEngine, "step")
    _timed(runner_module.ModelRunner, "prefill")
    _timed(async_engine.AsyncEngine, "_add")
    _timed(async_engine.AsyncEngine, "_publish")
    _timed(limits.BodySizeLimit, "__call__", "asgi")  # the app's outermost own layer
    _timed(api, "create_completion", "route")  # looked up by the route at call time
    _timed(_QueueProbe, "put")
    _swap_queue = async_engine.queue.SimpleQueue
    async_engine.queue.SimpleQueue = _QueueProbe  # the engine front's command queue, made below
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(model_names=["m"]))
    async_engine.queue.SimpleQueue = _swap_queue
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    while not server.started:
        time.sleep(0.05)
    vocab = llm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(1, vocab, (args.shared,), generator=g).tolist()
    rows = []
    with httpx.Client(timeout=600) as client:
        for r in range(args.requests + 3):  # 3 warm-ups: fill the cache, capture graphs
            body = json.dumps({"model": "m", "prompt": prefix + torch.randint(1, vocab, (args.own,), generator=g).tolist(),
                               "max_tokens": 2, "temperature": 0, "stream": True, "logprobs": 1, "ignore_eos": True})
            _events.clear()
            t_send = time.perf_counter()
            with client.stream("POST", f"http://127.0.0.1:{args.port}/v1/completions", content=body,
                               headers={"content-type": "application/json"}) as resp:
                t_first = None
                for line in resp.iter_lines():
                    if line.startswith("data:") and t_first is None:
                        t_first = time.perf_counter()
            if r >= 3:
                rows.append(phases(t_send, t_first))
    server.should_exit = True
    serving.join(60)  # the app's shutdown stops the engine thread before the interpreter exits
    med = {n: statistics.median(r[i] for r in rows) for i, n in enumerate(PHASES)}
    print(f"{args.model} on {llm.model.device}, prefix hit ({args.shared} cached + {args.own} prefilled tokens), "
          f"median of {len(rows)} requests:")
    for n, v in med.items():
        print(f"  {n:12s} {v:8.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "device": str(llm.model.device), "median_ms": med,
                       "requests_ms": [dict(zip(PHASES, r)) for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
