"""Load generator for an OpenAI-compatible server (`fast-xlstm serve`, or any other).

Sends streaming requests with the `openai` async client, either with Poisson arrivals at a given
rate (`--request-rate`, optionally capped by `--max-concurrency`) or from a fixed number of
concurrent clients (`--concurrency`), from one or several client processes (`--processes`: one
Python process parses only about 7,000 SSE chunks a second), and reports output tokens/s, time to
first token (TTFT), inter-token latency (ITL), time per output token (TPOT) and end-to-end latency
percentiles, as a table on stdout and as JSON (`--output`).

Prompts are random token ids of exactly `--prompt-tokens` tokens (`/v1/completions`), or random
words (`--prompt-kind text`, needed for `--endpoint chat`; the real token count comes from the
usage the server reports). `--shared-prefix-tokens N` starts every prompt with the same N tokens
(a shared system prompt), to measure prefix caching; the cached prompt tokens the server reports
are summed in the result. Outputs are exactly `--output-tokens` long (`ignore_eos`, an extension
fast-xlstm and vLLM accept).

Latencies count from the moment the HTTP request leaves the client (an httpx hook): the time the
`openai` SDK spends building a request before that (about 9 us per prompt token id, 18 ms for 2,000
ids) is the client's cost, reported apart as `client_build_ms`.

ITL is measured between SSE chunks: one per token, except that a chunk can carry two or more
tokens when a character spans tokens (the server sends whole characters); `--logprobs` makes the
server send one chunk per token (completions only), at a small cost.

Examples:
    python bench/load.py --base-url http://127.0.0.1:8000/v1 --concurrency 64 --num-requests 256 \\
        --prompt-tokens 512 --output-tokens 256 --output results/load_c64.json
    python bench/load.py --request-rate 8 --num-requests 200 --shared-prefix-tokens 2048 --prompt-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import multiprocessing
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

WORDS = ("time river light stone house water night story green paper window garden music early north "
         "silver market winter forest simple answer number letter follow bright corner island").split()


@dataclass
class RequestResult:
    ok: bool
    start: float = 0.0  # seconds since the benchmark started
    ttft: float | None = None
    e2e: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)  # seconds between successive content chunks
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    build: float | None = None  # seconds the client took to build the request before sending it
    error: str | None = None


def make_prompts(args: argparse.Namespace) -> list[list[int] | str]:
    """Per-request prompts (same seed, same prompts); each starts with the shared prefix if any."""
    rng = random.Random(args.seed)
    if args.prompt_kind == "tokens":
        prefix = [rng.randrange(1, args.vocab_size) for _ in range(args.shared_prefix_tokens)]
        return [prefix + [rng.randrange(1, args.vocab_size) for _ in range(args.prompt_tokens)]
                for _ in range(args.num_requests + args.warmup)]
    # Text: roughly one token per word with English BPE vocabularies.
    prefix = " ".join(rng.choice(WORDS) for _ in range(args.shared_prefix_tokens))
    return [(prefix + "\n\n" if prefix else "") + " ".join(rng.choice(WORDS) for _ in range(args.prompt_tokens))
            for _ in range(args.num_requests + args.warmup)]


# When the current request left the client: set by an httpx request hook, per asyncio task.
_SENT: contextvars.ContextVar[list[float]] = contextvars.ContextVar("sent")


async def _mark_sent(request: httpx.Request) -> None:
    box = _SENT.get(None)
    if box is not None and not box:
        box.append(time.perf_counter())


async def one_request(client, args: argparse.Namespace, prompt: list[int] | str, t0: float) -> RequestResult:
    """One streamed request. Latencies count from when the HTTP request is sent: the `openai` SDK's
    own request building (about 9 us per prompt token id) is client cost, kept as `build`."""
    res = RequestResult(ok=False, start=time.perf_counter() - t0)
    common = dict(model=args.model, max_tokens=args.output_tokens, temperature=args.temperature, stream=True,
                  stream_options={"include_usage": True}, extra_body={"ignore_eos": not args.allow_eos})
    called = time.perf_counter()
    box: list[float] = []
    _SENT.set(box)
    last = None
    try:
        if args.endpoint == "chat":
            messages = [{"role": "user", "content": prompt}]
            stream = await client.chat.completions.create(messages=messages, **common)
        else:
            stream = await client.completions.create(prompt=prompt, logprobs=0 if args.logprobs else None, **common)
        sent = box[0] if box else called
        res.build = sent - called
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                has_content = (c.delta.content if args.endpoint == "chat" else (c.text or c.logprobs))
                if has_content:
                    if res.ttft is None:
                        res.ttft = now - sent
                    else:
                        res.chunk_gaps.append(now - last)
                    last = now
            if chunk.usage is not None:
                res.prompt_tokens = chunk.usage.prompt_tokens
                res.output_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                res.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
        res.e2e = time.perf_counter() - sent
        res.ok = True
    except Exception as e:  # a load test counts failures instead of stopping at the first
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(args: argparse.Namespace, share: int = 0, shares: int = 1, barrier=None
              ) -> tuple[list[RequestResult], float, float]:
    """Runs share `share` of `shares` of the load (every shares-th prompt, its part of the clients or
    of the request rate); returns the results and the measured window (start, end) in
    `time.perf_counter` seconds, a system-wide clock on Linux, so windows of processes compare."""
    import openai

    # TCP_NODELAY: httpx writes a request's headers and body separately; with Nagle on, the body
    # waits for the server's (delayed, up to 40 ms on Linux) ACK of the headers, which would add
    # tens of milliseconds to every measured time to first token.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    http_client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(socket_options=nodelay),
                                    timeout=args.timeout, limits=httpx.Limits(max_connections=None),
                                    event_hooks={"request": [_mark_sent]})
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0,
                                timeout=args.timeout, http_client=http_client)
    if args.model is None:
        args.model = (await client.models.list()).data[0].id
    prompts = make_prompts(args)
    warm, prompts = prompts[:args.warmup][share::shares], prompts[args.warmup:][share::shares]
    if warm:  # e.g. CUDA graph capture and allocator growth, outside the measurement
        await asyncio.gather(*[one_request(client, args, p, time.perf_counter()) for p in warm])
    if barrier is not None:  # every process starts measuring together
        await asyncio.to_thread(barrier.wait)
    t0 = time.perf_counter()
    if args.request_rate is None:
        queue = iter(prompts)
        clients = args.concurrency // shares + (share < args.concurrency % shares)

        async def worker() -> list[RequestResult]:
            return [await one_request(client, args, p, t0) for p in queue]  # shared iterator: next free prompt

        results = [r for rs in await asyncio.gather(*[worker() for _ in range(clients)]) for r in rs]
    else:
        rng = random.Random(args.seed + 1 + share)
        cap = args.max_concurrency
        sem = asyncio.Semaphore((cap // shares + (share < cap % shares)) if cap else len(prompts) or 1)

        async def limited(p) -> RequestResult:
            async with sem:
                return await one_request(client, args, p, t0)

        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            # Poisson process: exponential gaps (the shares' processes superpose to the full rate)
            await asyncio.sleep(rng.expovariate(args.request_rate / shares))
        results = await asyncio.gather(*tasks)
    end = time.perf_counter()
    await client.close()
    return results, t0, end


def _run_share(args: argparse.Namespace, share: int, shares: int, barrier, out) -> None:
    """Entry of one client process: its results go back as dicts through the `out` queue."""
    try:
        results, start, end = asyncio.run(run(args, share, shares, barrier))
        out.put((share, [asdict(r) for r in results], start, end, None))
    except BaseException as e:  # report instead of leaving the parent waiting
        barrier.abort()
        out.put((share, [], 0.0, 0.0, f"{type(e).__name__}: {e}"))


def run_processes(args: argparse.Namespace) -> tuple[list[RequestResult], float]:
    """The load from `args.processes` client processes (one Python process parses only so many SSE
    chunks per second; at thousands of tokens per second a single client would be the bottleneck)."""
    if args.processes == 1:
        results, start, end = asyncio.run(run(args))
        return results, end - start
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(args.processes), ctx.Queue()
    procs = [ctx.Process(target=_run_share, args=(args, i, args.processes, barrier, out))
             for i in range(args.processes)]
    for pr in procs:
        pr.start()
    parts = [out.get() for _ in procs]
    for pr in procs:
        pr.join()
    errors = [e for *_, e in parts if e]
    if errors:
        raise RuntimeError(f"client process failed: {errors[0]}")
    start, end = min(p[2] for p in parts), max(p[3] for p in parts)
    results = [RequestResult(**r) for p in sorted(parts, key=lambda p: p[0]) for r in p[1]]
    return results, end - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values) * 1e3  # milliseconds
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, args: argparse.Namespace) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.ttft is not None and r.output_tokens > 1]
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("api_key", "output", "save_requests")},
        "requests": {"completed": len(ok), "failed": len(results) - len(ok),
                     "errors": sorted({r.error for r in results if r.error})[:5]},
        "duration_s": duration,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt_tokens,
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "output_throughput_tok_s": out_tokens / duration if duration else None,
        "total_throughput_tok_s": (out_tokens + prompt_tokens) / duration if duration else None,
        "request_throughput_req_s": len(ok) / duration if duration else None,
        "ttft_ms": percentiles([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": percentiles([g for r in ok for g in r.chunk_gaps]),
        "tpot_ms": percentiles(tpot),
        "e2e_ms": percentiles([r.e2e for r in ok if r.e2e is not None]),
        "client_build_ms": percentiles([r.build for r in ok if r.build is not None]),
    }


def print_table(s: dict) -> None:
    req = s["requests"]
    print(f"requests: {req['completed']} completed, {req['failed']} failed in {s['duration_s']:.2f} s")
    for e in req["errors"]:
        print(f"  error: {e}")
    print(f"output throughput: {s['output_throughput_tok_s']:.1f} tok/s  (total {s['total_throughput_tok_s']:.1f} "
          f"tok/s, {s['request_throughput_req_s']:.2f} req/s)")
    print(f"prompt tokens: {s['prompt_tokens']} ({s['cached_prompt_tokens']} cached), output tokens: "
          f"{s['output_tokens']}")
    print(f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        row = s[key]
        cells = "".join(f"{row[k]:>10.1f}" if row[k] is not None else f"{'-':>10}"
                        for k in ("mean", "p50", "p90", "p99"))
        print(f"{key.removesuffix('_ms'):<6}{cells}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="default: the first model the server lists")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=None, help="fixed number of clients, back to back")
    mode.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests per second")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on open requests with --request-rate")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not measured) before the run")
    p.add_argument("--prompt-tokens", type=int, default=512, help="per-request prompt length (after the prefix)")
    p.add_argument("--output-tokens", type=int, default=256)
    p.add_argument("--shared-prefix-tokens", type=int, default=0, help="a prefix every prompt shares")
    p.add_argument("--prompt-kind", choices=("tokens", "text"), default=None,
                   help="random token ids (completions only; default there) or random words (default for chat)")
    p.add_argument("--vocab-size", type=int, default=1000, help="random ids are drawn from [1, vocab-size)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--allow-eos", action="store_true", help="let requests end early on EOS")
    p.add_argument("--logprobs", action="store_true", help="one SSE chunk per token (completions only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=1,
                   help="client processes sharing the load (clients, rate and prompts split evenly)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout, seconds")
    p.add_argument("--output", default=None, help="write the summary as JSON here")
    p.add_argument("--save-requests", action="store_true", help="include per-request timings in the JSON")
    args = p.parse_args(argv)
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = 64
    args.prompt_kind = args.prompt_kind or ("text" if args.endpoint == "chat" else "tokens")
    if args.endpoint == "chat" and args.prompt_kind == "tokens":
        p.error("--endpoint chat needs --prompt-kind text")
    if args.logprobs and args.endpoint == "chat":
        p.error("--logprobs is for --endpoint completions")
    for name in ("num_requests", "prompt_tokens", "output_tokens", "vocab_size", "processes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, duration = run_processes(args)
    summary = summarize(results, duration, args)
    print_table(summary)
    if args.output:
        if args.save_requests:
            summary["per_request"] = [asdict(r) for r in results]
        with open(args.output, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {args.output}")
    return 0 if summary["requests"]["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
