"""Where a server request's time to first token goes, on a prefix-cache hit (in-process server).

Runs `create_app` under uvicorn in a thread of this process, sends streaming completions whose
prompts share a `--shared`-token prefix plus `--own` tokens (token ids, logprobs on, as the serve
benchmark does), and times each request's phases with wrappers around the engine thread's work:

  send->add    request sent -> the engine thread starts adding it (HTTP, JSON, validation, queue)
  add          the engine's add_request
  add->step    added -> the engine step that prefills it starts
  step         that step (prefill of the own tokens from the cached prefix state, first token)
  step->pub    step end -> its outputs handed to the event loop
  pub->client  handed over -> the first SSE event read by the client (SSE encoding, socket)

Same model build as `fast-xlstm serve` (`LLM(preset)`), so the figures match a real server's.

    python bench/profile_server_ttft.py [--model xlstm-7b] [--compile] [--requests 24] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from fast_xlstm.engine import engine as engine_module
from fast_xlstm.llm import LLM
from fast_xlstm.server import async_engine
from fast_xlstm.server.api import create_app
from fast_xlstm.server.config import ServerConfig

PHASES = ("send->add", "add", "add->step", "step", "step->pub", "pub->client", "ttft")
_events: list[tuple[str, float, float]] = []


def _timed(cls: type, name: str) -> None:
    """Wraps cls.name so each call appends (name, start, end) to the event log."""
    inner = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = inner(self, *args, **kwargs)
        _events.append((name, t0, time.perf_counter()))
        return out

    setattr(cls, name, wrapper)


def phases(t_send: float, t_first: float) -> tuple[float, ...]:
    first = {n: next(e for e in _events if e[0] == n) for n in ("_add", "step", "_publish")}
    add, step, pub = first["_add"], first["step"], first["_publish"]
    ms = [add[1] - t_send, add[2] - add[1], step[1] - add[2], step[2] - step[1], pub[2] - step[2],
          t_first - pub[2], t_first - t_send]
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
    _timed(async_engine.AsyncEngine, "_add")
    _timed(async_engine.AsyncEngine, "_publish")
    app = create_app(llm.engine, llm.tokenizer, ServerConfig(model_names=["m"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
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
