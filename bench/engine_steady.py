"""Engine throughput in a steady state of arrivals and departures, without HTTP (7B shape, random weights).

`--slots` requests are kept running: the first ones get staggered output lengths, so they finish at
different steps, and each that finishes is replaced at once by a new request (`--prompt` tokens,
`--output` tokens). After `--warm-steps` steps the next `--steps` are timed: output tokens per
second, and how much of the window the GPU was busy (a torch.profiler trace of `--profile-steps`
of them, kernel intervals merged), so host gaps show apart from device time, with the gaps' causes
(`trace_gaps.idle_gaps`: a host sync or slow launches, labelled by the engine or runner method
that was running on the host). Each configuration in
`--configs` is its own engine on the same weights, one after the other in this process:

    default       prefill apart from decode (the server's default)
    mixed         --mixed-steps
    trickleN      --trickle-tokens N (mixed steps; at most N prompt tokens a step while many decode)

    python bench/engine_steady.py [--configs default,trickle128] [--slots 64] [--out FILE.json]
    python bench/engine_steady.py --model xlstm-tiny --slots 3 --prompt 20 --output 6 --steps 8 --no-compile
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fast_xlstm.bench.report import save_json, script_result
from fast_xlstm.config import get_preset
from fast_xlstm.engine import LLMEngine
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.model import XLSTMForCausalLM


def parse_config(name: str) -> dict:
    """"default" / "mixed" / "trickle128" -> LLMEngine options."""
    if name == "default":
        return {}
    if name == "mixed":
        return {"mixed_steps": True}
    if name.startswith("trickle") and name[7:].isdigit() and int(name[7:]) > 0:
        return {"mixed_steps": True, "trickle_tokens": int(name[7:])}
    raise SystemExit(f"--configs: expected default, mixed or trickleN (N > 0), got {name!r}")


def busy_ms(prof) -> float:
    """Milliseconds of the trace during which at least one kernel or copy ran on the device."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3  # (profiler times are in microseconds)


TRACED = {"runner": ("prefill_launch", "prefill_collect", "decode_launch", "decode_collect", "_sample_launch",
                     "_prefill_planned", "_feed_last_tokens", "start_request", "restore", "snapshot"),
          "engine": ("_accept", "_first_tokens", "_prefill_launched", "_on_admit"),
          "scheduler": ("schedule",)}


def annotate(engine: LLMEngine) -> None:
    """Wraps the engine's, runner's and scheduler's host steps (`TRACED`) in profiler labels, so an idle
    gap of the device names the host work it waited on."""
    for owner, names in TRACED.items():
        obj = {"runner": engine.runner, "engine": engine, "scheduler": engine.scheduler}[owner]
        for name in names:
            fn = getattr(obj, name)

            def labelled(*a, _fn=fn, _label=f"{owner}.{name}", **k):
                with torch.profiler.record_function(_label):
                    return _fn(*a, **k)
            setattr(obj, name, labelled)


def idle_by_cause(prof) -> dict:
    """The traced window's device idle gaps by cause (`trace_gaps.idle_gaps`)."""
    import tempfile
    from pathlib import Path

    from trace_gaps import idle_gaps  # (bench/ is the script's folder)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return idle_gaps(path, min_gap_us=20.0, top=12)


def run_config(model, name: str, args, sync) -> dict:
    engine = LLMEngine(model, None, max_num_seqs=args.slots, compile_decode=not args.no_compile,
                       compile_prefill=not args.no_compile, async_scheduling=True, **parse_config(name))
    engine.warm_up()
    annotate(engine)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def add(max_tokens: int) -> None:
        prompt = torch.randint(1, vocab, (args.prompt,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

    for i in range(args.slots):  # staggered first lengths: departures spread over one request's life
        add(max(1, (i + 1) * args.output // args.slots))
    tokens, steps, mixed0 = 0, 0, 0
    t0, trace, profiled = None, None, None
    # the traced steps, in the second half of the timed ones (at most all of that half)
    start = args.warm_steps + args.steps // 2
    window = range(start, start + min(args.profile_steps, args.steps - args.steps // 2))
    while steps < args.warm_steps + args.steps:
        if steps == args.warm_steps:
            sync()
            t0, tokens, mixed0 = time.perf_counter(), 0, engine.stats["mixed_steps"]
            prefilled0 = engine.stats["prompt_tokens"]
        if steps == window.start and len(window) and torch.cuda.is_available():
            trace = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            trace.__enter__()
            tw = time.perf_counter()
        outs = engine.step()
        steps += 1
        if trace is not None and steps == window.stop:
            sync()
            wall_ms = 1e3 * (time.perf_counter() - tw)
            trace.__exit__(None, None, None)
            profiled = {"steps": len(window), "wall_ms": wall_ms, "gpu_busy_ms": busy_ms(trace)}
            profiled["gpu_busy_share"] = profiled["gpu_busy_ms"] / wall_ms
            try:
                profiled["idle"] = idle_by_cause(trace)
            except Exception as e:  # the analysis is a diagnostic: its failure must not lose the run
                profiled["idle_error"] = f"{type(e).__name__}: {e}"
            trace = None
        for o in outs:
            tokens += len(o.new_token_ids) if steps > args.warm_steps else 0
            if o.finished:
                add(args.output)
    sync()
    seconds = time.perf_counter() - t0
    row = {"config": name, "options": parse_config(name), "steps": args.steps, "seconds": seconds,
           "output_tokens": tokens, "output_tok_s": tokens / seconds, "ms_per_step": 1e3 * seconds / args.steps,
           "mixed_steps": engine.stats["mixed_steps"] - mixed0,
           "prompt_tokens": engine.stats["prompt_tokens"] - prefilled0}
    if profiled is not None:
        row["profiled"] = profiled
    print(f"[engine_steady] {name}: {row['output_tok_s']:.0f} output tok/s, {row['ms_per_step']:.2f} ms/step, "
          f"{row['mixed_steps']} mixed steps, {row['prompt_tokens']} prompt tokens"
          + (f"; GPU busy {profiled['gpu_busy_share']:.3f} of {profiled['wall_ms']:.1f} ms"
             if "profiled" in row else ""), flush=True)
    for cause in row.get("profiled", {}).get("idle", {}).get("by_cause", [])[:8]:
        print(f"[engine_steady]   idle {cause['ms']:7.2f} ms in {cause['gaps']:4d} gaps: {cause['cause']}", flush=True)
    for r in list(engine.requests):
        engine.abort(r)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--configs", default="default,trickle128")
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=256)
    ap.add_argument("--warm-steps", type=int, default=300, help="steps before the timed window")
    ap.add_argument("--steps", type=int, default=400, help="timed steps")
    ap.add_argument("--profile-steps", type=int, default=24, help="steps traced inside the window (CUDA)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for n in names:
        parse_config(n)
    cuda = torch.cuda.is_available()
    model = XLSTMForCausalLM.from_config(get_preset(args.model), dtype=torch.bfloat16 if cuda else torch.float32,
                                         device="cuda" if cuda else "cpu", seed=0).fuse_projections()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for n in names:
        rows.append(run_config(model, n, args, sync))
        gc.collect()  # the engine (its state pool and graphs) goes before the next one is built
        if cuda:
            torch.cuda.empty_cache()
    save_json(args.out, script_result("engine_steady", args.model, "cuda" if cuda else "cpu",
                                      compiled=not args.no_compile, slots=args.slots, prompt=args.prompt,
                                      output=args.output, rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
