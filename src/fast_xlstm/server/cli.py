"""`fast-xlstm serve`: load a model, build the engine, serve the OpenAI API with uvicorn."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import sys


def cmd_serve(args: argparse.Namespace) -> int:
    try:  # the serve extra is optional: say how to get it instead of a traceback
        import uvicorn

        from .api import create_app
    except ImportError as exc:
        print(f"[fast-xlstm] serve needs the serve extra (pip install 'fast-xlstm[serve]'): {exc}", file=sys.stderr)
        return 2
    for flag, module in (("loop", "uvloop"), ("http", "httptools")):
        if getattr(args, flag) == module and importlib.util.find_spec(module) is None:
            print(f"[fast-xlstm] --{flag} {module} needs the {module} package (pip install 'uvicorn[standard]')",
                  file=sys.stderr)
            return 2
    import torch

    from ..llm import LLM
    from ..loading import default_device
    from .config import ServerConfig

    cuda = torch.device(args.device or default_device()).type == "cuda"
    trickle = trickle_options(args, cuda)
    if isinstance(trickle, str):
        print(f"[fast-xlstm] {trickle}", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = ServerConfig(model_names=args.served_model_name or [args.model or "fast-xlstm-default"],
                          api_key=args.api_key or os.environ.get("FAST_XLSTM_API_KEY") or None,
                          max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens,
                          max_request_bytes=args.max_request_bytes, max_n=args.max_n)
    # The offline `LLM` builds the model exactly as `LLM(model).generate` does (same seed for a
    # preset's random weights), so the server's outputs equal offline ones run with the same compile
    # setting (`LLM(..., compile_decode=True, compile_prefill=True)` for a compiled server).
    compile_ = cuda if args.compile is None else args.compile  # default: compiled on CUDA (the measured fast path)
    llm = LLM(args.model, dtype=args.dtype, state_dtype=args.state_dtype, device=args.device,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              use_cuda_graph=False if args.no_cuda_graph else None, compile_decode=compile_, compile_prefill=compile_,
              max_graph_prefill_tokens=args.max_graph_prefill_tokens, enable_prefix_cache=not args.no_prefix_cache, prefix_block=args.prefix_block,
              cache_device_bytes=int(args.prefix_cache_gb * 2**30),
              cache_host_bytes=int(args.prefix_cache_host_gb * 2**30),
              max_sessions_device_bytes=int(args.session_cache_gb * 2**30),
              max_sessions_host_bytes=int(args.session_cache_host_gb * 2**30), step_log=args.step_log,
              async_scheduling=args.async_scheduling, mixed_steps=args.mixed_steps or bool(trickle["trickle_tokens"]),
              **trickle)
    if args.warmup:
        seconds = llm.engine.warm_up()
        print(f"[fast-xlstm] warmed up in {seconds:.1f} s (decode graphs, graph prefills, kernel compiles)",
              file=sys.stderr, flush=True)
    print(f"[fast-xlstm] serving {llm.source} as {', '.join(config.model_names)} on http://{args.host}:{args.port} "
          f"({llm.model.device}, {args.max_num_seqs} state slots)", file=sys.stderr, flush=True)
    app = create_app(llm.engine, llm.tokenizer, config)
    # What exists now (modules, model, engine, app) lives as long as the process. Frozen, the cyclic
    # GC's full collections no longer walk it: unfrozen, one took 115 ms in the first burst of 64
    # requests (tiny model on CPU, bench/server_burst.py; none in four bursts frozen), holding the GIL
    # that the engine thread's steps need.
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, loop=args.loop, http=args.http,
                timeout_graceful_shutdown=args.shutdown_timeout)
    return 0


# Trickle prefill's defaults on CUDA: pieces of 256 tokens while at most 64 pieces' worth of prompt
# waits and at most 128 requests decode. On an H100 at 64 open requests (Poisson, 512 prompt / 256 output
# tokens) a 256-token piece in a ~63-row decode step cost 14.6 us per prompt token against ~25 us in a
# pack (bench/results/h100-serve/desync-ab89637). With these defaults served throughput was 0.832 of
# static decode against 0.786 without trickle, and within 1.3% of it at 256 open and in waves
# (h100-serve/trickle-default-f374368); without the decode bound, 256 open requests waited longer for
# their first tokens (h200-serve/trickle-7edd0b7), and with no backlog bound a wave of 256 starved the
# decode batch (h100-serve/waves-ab89637).
TRICKLE_TOKENS, TRICKLE_BACKLOG_PIECES, TRICKLE_MAX_DECODE = 256, 64, 128


def trickle_options(args: argparse.Namespace, cuda: bool) -> dict | str:
    """The engine's trickle options from the command line (each default resolved), or what is wrong.

    Trickle needs mixed steps, which need the Triton kernels: on by default only on CUDA."""
    from ..engine.scheduler import trickle_min_decode  # the engine package imports torch: not at CLI start-up

    tokens = args.trickle_tokens if args.trickle_tokens is not None else (TRICKLE_TOKENS if cuda else 0)
    if tokens < 0:
        return "--trickle-tokens must be >= 0 (0: off)"
    if not tokens and (args.trickle_backlog is not None or args.trickle_max_decode is not None):
        return ("--trickle-backlog and --trickle-max-decode need --trickle-tokens N > 0 "
                "(trickle is off by default where there is no CUDA)")
    if args.trickle_backlog is not None and args.trickle_backlog < 0:
        return "--trickle-backlog must be >= 0"
    fewest = trickle_min_decode(args.max_num_seqs)
    if args.trickle_max_decode is not None and args.trickle_max_decode < fewest:
        return (f"--trickle-max-decode must be >= {fewest}, the fewest decoding requests with which a step "
                "trickles (16, or a quarter of --max-num-seqs if fewer)")
    if not tokens:
        return {"trickle_tokens": 0}
    backlog = TRICKLE_BACKLOG_PIECES * tokens if args.trickle_backlog is None else args.trickle_backlog
    max_decode = TRICKLE_MAX_DECODE if args.trickle_max_decode is None else args.trickle_max_decode
    return {"trickle_tokens": tokens, "trickle_backlog": backlog, "trickle_max_decode": max_decode}


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `serve` to the `fast-xlstm` command line."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--model", default=None, help="checkpoint directory or preset (default: the bundled Shakespeare model)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients pass as `model` (default: the --model argument)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $FAST_XLSTM_API_KEY, else none)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--state-dtype", default="float32", help="recurrent state dtype: float32 | bfloat16")
    p.add_argument("--max-num-seqs", type=int, default=256, help="state slots: requests decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384, help="prompt tokens per engine step")
    p.add_argument("--max-model-len", type=int, default=1_000_000,
                   help="most prompt + generated tokens per request (a recurrent model has no context window; "
                        "this bounds the work one request may ask for)")
    p.add_argument("--default-max-tokens", type=int, default=4096,
                   help="generated tokens when a chat request sets no max_tokens")
    p.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024, help="larger bodies get a 413")
    p.add_argument("--max-n", type=int, default=128, help="the most choices (n) per request")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager decode on CUDA (debugging)")
    p.add_argument("--max-graph-prefill-tokens", type=int, default=2048,
                   help="prefills of up to this many tokens (of up to 8 prompts) replay CUDA graphs (0 = never)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and prefill regions: the fast path, ~1 min more start-up "
                        "on a cold cache (default: on for CUDA, off on CPU)")
    p.add_argument("--no-prefix-cache", action="store_true", help="turn the prompt-prefix state cache off")
    p.add_argument("--prefix-block", type=int, default=512, help="prefix-cache snapshot interval in tokens")
    p.add_argument("--prefix-cache-gb", type=float, default=4.0, help="prefix-cache snapshots kept on the device")
    p.add_argument("--prefix-cache-host-gb", type=float, default=16.0, help="... and spilled to host memory")
    p.add_argument("--session-cache-gb", type=float, default=4.0, help="session states kept on the device")
    p.add_argument("--session-cache-host-gb", type=float, default=16.0, help="... and spilled to host memory")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests may finish after SIGINT/SIGTERM before they are aborted")
    p.add_argument("--mixed-steps", action="store_true",
                   help="run a step's decode and its prefill as one forward (one weight read for both; needs the "
                        "Triton kernels); implied by --trickle-tokens (on by default on CUDA), else off: 1.02-1.32x "
                        "faster steps on an H100, served throughput within noise on its own")
    p.add_argument("--trickle-tokens", type=int, default=None, metavar="N",
                   help="while 16 or more requests decode (a quarter of --max-num-seqs if fewer), at most "
                        "--trickle-max-decode do and at most --trickle-backlog prompt tokens wait, a step prefills at "
                        f"most N of them inside the decode step's forward (implies --mixed-steps). Default {TRICKLE_TOKENS} "
                        "on CUDA, 0 (off) elsewhere")
    p.add_argument("--trickle-backlog", type=int, default=None, metavar="TOKENS",
                   help=f"the most pending prompt tokens that still trickle (default {TRICKLE_BACKLOG_PIECES}N); "
                        "above it a step prefills a full pack. A large value trickles whole waves too")
    p.add_argument("--trickle-max-decode", type=int, default=None, metavar="ROWS",
                   help=f"no trickling while more than ROWS requests decode (default {TRICKLE_MAX_DECODE}): in a big "
                        "decode batch a piece costs about what it costs in a pack")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="launch each decode step before reading the previous one's tokens, so the host's per-token "
                        "work overlaps the GPU (default on; --no-async-scheduling steps synchronously)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="before serving, capture the decode graphs and graph prefills and compile the kernels "
                        "that the first requests would otherwise wait for (default on)")
    p.add_argument("--step-log", default=None, metavar="FILE",
                   help="append one JSON line per engine step (timing and batch composition) to FILE")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    # uvicorn's choices; "auto" takes uvloop and httptools when installed (the `serve` extra installs them:
    # on a 2-core CPU with the tiny model a prefix-hit request's time to first token fell 0.2-0.8 ms
    # with them, bench/results/cpu-server-http; on an H100 host no measurable change, h100-serve/prefix-http-a4c2d25)
    p.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"),
                   help="the server's event loop (default: uvloop when installed)")
    p.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                   help="the server's HTTP/1.1 parser (default: httptools when installed)")
    p.set_defaults(func=cmd_serve)
