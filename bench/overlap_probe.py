"""Does prefill overlap with decode on the device? Decode steps on a second CUDA stream beside a prefill.

Served throughput at many concurrent requests is bound by running each engine step's prefill and
decode one after the other (`bench/results/README.md`, "The bound on served throughput"): decode at
batch 64-256 is bound by state traffic, prefill by tensor-core time, so the two might share the GPU.
This measures, on the runner the server uses, for each case DECODE:COUNTxLENGTH:STEPS (decoding
requests : prompts x tokens each : decode steps):

- `decode_ms`: STEPS decode steps (CUDA-graph replays) alone;
- `prefill_ms`: the prefill of COUNT prompts of LENGTH tokens alone;
- `serial_ms`: both on one stream (the engine today);
- `overlap_ms` / `overlap_hi_ms`: the decode steps queued on a second stream (of default / high
  priority) while the prefill runs on the first;
- `hidden`: (serial - overlap) / min(decode, prefill), the share of the shorter side that overlap hid
  (0: none, 1: all of it).

With `--green-sms K,...` (CUDA green contexts, `torch.cuda.green_contexts`) each K also splits the SMs:
decode on a context of K SMs, prefill on one of the rest. `green{K}_decode_ms` / `green{K}_prefill_ms`
time each side alone on its share, `green{K}_overlap_ms` both at once, and `hidden_green{K}` is
figured as above. Where the driver or the build refuses, the row records the error instead.
`--green-capture` records the decode graphs on the decode context's stream (captured in the primary
context they run on every SM whatever stream replays them) and adds `green{K}_fullprefill_ms`, the
confined decode beside a prefill on every SM. torch's green contexts each come from a split of
their own and can share SMs; `--green-disjoint` makes both from one split (`green{K}_sms` records
the SM counts the driver gave).

The decode and prefill rows are different pool slots, so the two never touch each other's states;
sampled tokens may mix between them (a timing probe, not an engine). Every prefill takes the eager
in-pool path: the graph-captured prefills share the decode graphs' memory pool, so replaying both at
once would overwrite each other's intermediates (a first run of this probe hit an index assert so).

    python bench/overlap_probe.py --cases 128:16x512:16,64:16x512:32,192:8x512:8 --out bench/results/overlap.json
    python bench/overlap_probe.py --model xlstm-tiny --cases 3:2x16:2 --no-compile   # plumbing check (CPU)
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import nullcontext

import torch

from fast_xlstm.bench.report import save_json, script_result
from fast_xlstm.engine.runner import DecodeMode
from mixed_step import GREEDY, bench_runner, timed_runs


def parse_cases(text: str) -> list[tuple[int, int, int, int]]:
    """"128:16x512:16" -> [(128, 16, 512, 16)] (decode rows, prompts, tokens each, decode steps)."""
    cases = []
    for part in text.split(","):
        try:
            dec, pack, steps = part.strip().split(":")
            count, length = pack.split("x")
            nums = (int(dec), int(count), int(length), int(steps))
        except ValueError:
            nums = (0,)
        if min(nums) < 1:
            raise SystemExit(f"--cases: expected DECODE:COUNTxLENGTH:STEPS items like 128:16x512:16, got {part!r}")
        cases.append(nums)
    return cases


def green_streams(num_sms: int, disjoint: bool = False) -> tuple[list, torch.cuda.Stream, torch.cuda.Stream]:
    """Two green contexts on device 0, of num_sms SMs and of the SMs left, and a stream on each:
    (contexts, which the caller keeps alive; decode stream; prefill stream).

    torch's `GreenContext.create` splits the device's SMs anew for each context and takes the first
    group each time, so two contexts made that way can share SMs (pytorch/pytorch#195378: both
    start from the same SMs). With `disjoint`, one split (CUDA driver API through cuda-python)
    gives both contexts: num_sms SMs and the remainder, no SM in both."""
    if disjoint:
        return _disjoint_green_streams(num_sms)
    from torch.cuda.green_contexts import GreenContext

    total = torch.cuda.get_device_properties(0).multi_processor_count
    contexts, streams = [], []
    for sms in (num_sms, total - num_sms):
        ctx = GreenContext.create(num_sms=sms, device_id=0)
        contexts.append(ctx)
        streams.append(ctx.Stream())
    return contexts, streams[0], streams[1]


def _disjoint_green_streams(num_sms: int) -> tuple[list, torch.cuda.Stream, torch.cuda.Stream]:
    from cuda.bindings import driver

    def check(result: tuple):  # cuda-python returns (CUresult, *outputs)
        err, *values = result
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return values[0] if len(values) == 1 else values

    torch.cuda.init()  # the primary context exists before the driver calls
    dev = check(driver.cuDeviceGet(0))
    sms = check(driver.cuDeviceGetDevResource(dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _, rest = check(driver.cuDevSmResourceSplitByCount(1, sms, 0, num_sms))
    contexts, streams = [], []
    for part in (groups[0], rest):
        desc = check(driver.cuDevResourceGenerateDesc([part], 1))
        ctx = check(driver.cuGreenCtxCreate(desc, dev, driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        handle = check(driver.cuGreenCtxStreamCreate(ctx, driver.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        contexts.append((ctx, handle, part.sm.smCount))
        streams.append(torch.cuda.get_stream_from_external(int(handle), torch.device("cuda", 0)))
    print(f"[overlap_probe] disjoint green contexts of {contexts[0][2]} and {contexts[1][2]} SMs", flush=True)
    return contexts, streams[0], streams[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--cases", default="128:16x512:16,64:16x512:32,192:8x512:8,255:4x512:4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager block regions and decode (plumbing checks)")
    ap.add_argument("--green-sms", default="", help="SM counts for decode's green context, e.g. 32,48 (CUDA)")
    ap.add_argument("--green-disjoint", action="store_true",
                    help="both green contexts from one SM split (cuda-python), so they share no SM")
    ap.add_argument("--green-capture", action="store_true",
                    help="capture the decode graphs on the green decode stream (else in the primary context)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cases = parse_cases(args.cases)
    green_sms = [int(k) for k in args.green_sms.split(",") if k]
    # every prefill on the eager in-pool path: see the module docstring
    runner, sync = bench_runner(args.model, max(d + c for d, c, _, _ in cases), not args.no_compile,
                                max_graph_prefill_tokens=0)
    model, device = runner.model, runner.device.type
    cuda = device == "cuda"
    mode = DecodeMode.of([GREEDY])
    main_stream = torch.cuda.current_stream() if cuda else None
    side = {"default": torch.cuda.Stream() if cuda else None,
            "high": torch.cuda.Stream(priority=torch.cuda.Stream.priority_range()[1]) if cuda else None}
    g = torch.Generator().manual_seed(0)
    rows = []
    for dec, count, length, steps in cases:
        pieces = [torch.randint(1, model.config.vocab_size, (length,), generator=g).tolist() for _ in range(count)]
        dec_slots, pre_slots = list(range(dec)), list(range(dec, dec + count))

        def decode_steps(stream=None) -> None:
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for _ in range(steps):
                    runner.decode_launch(dec_slots, mode)

        def prefill() -> None:
            runner.prefill_launch(pre_slots, pieces, [True] * count, [GREEDY] * count)

        def overlapped(which: str):
            def run() -> None:
                stream = side[which]
                if stream is not None:
                    stream.wait_stream(main_stream)
                decode_steps(stream)  # graph replays: little host time, so both sides start together
                prefill()
                if stream is not None:
                    main_stream.wait_stream(stream)
            return run

        def on_green(dec_stream, pre_stream, both: bool, which: str = ""):
            def run() -> None:
                for s in (dec_stream, pre_stream):
                    s.wait_stream(main_stream)
                if both or which == "decode":
                    decode_steps(dec_stream)
                if both or which == "prefill":
                    with torch.cuda.stream(pre_stream):
                        prefill()
                for s in (dec_stream, pre_stream):
                    main_stream.wait_stream(s)
            return run

        ways = {"decode": decode_steps, "prefill": prefill, "serial": lambda: (decode_steps(), prefill()),
                "overlap": overlapped("default"), "overlap_hi": overlapped("high")}
        row = {"decode_rows": dec, "prompts": count, "tokens_each": length, "decode_steps": steps}

        def time_ways(batch: dict) -> None:
            for name, fn in batch.items():
                try:
                    walls, _ = timed_runs(fn, lambda: runner.pool.reset(dec_slots + pre_slots), sync, args.repeat)
                except Exception as e:  # e.g. a graph or kernel launch a green context refuses
                    row[f"{name}_error"] = f"{type(e).__name__}: {e}"
                    print(f"[overlap_probe] {name}: {row[f'{name}_error']}", flush=True)
                    continue
                row[f"{name}_ms"] = statistics.median(walls)

        time_ways(ways)
        contexts = []  # the green contexts outlive their streams' use
        for k in green_sms if cuda else []:
            try:
                ctxs, dec_stream, pre_stream = green_streams(k, disjoint=args.green_disjoint)
            except Exception as e:  # an old driver, a build without green contexts, an SM count refused
                row[f"green{k}_error"] = f"{type(e).__name__}: {e}"
                print(f"[overlap_probe] green contexts of {k} SMs: {row[f'green{k}_error']}", flush=True)
                continue
            contexts.append(ctxs)
            if args.green_disjoint:
                row[f"green{k}_sms"] = [sms for _, _, sms in ctxs]
            if args.green_capture:  # the decode graphs recorded on the decode context's stream
                runner.capture_decode_on(dec_stream)
            time_ways({f"green{k}_decode": on_green(dec_stream, pre_stream, False, "decode"),
                       f"green{k}_prefill": on_green(dec_stream, pre_stream, False, "prefill"),
                       f"green{k}_overlap": on_green(dec_stream, pre_stream, True)})
            if args.green_capture:
                # decode on its K SMs beside a prefill on every SM (the primary context's stream)
                def beside_full(dec_stream=dec_stream) -> None:
                    dec_stream.wait_stream(main_stream)
                    decode_steps(dec_stream)
                    prefill()
                    main_stream.wait_stream(dec_stream)

                time_ways({f"green{k}_fullprefill": beside_full})
                runner.capture_decode_on(None)
        shorter = min(row["decode_ms"], row["prefill_ms"])
        for name in ("overlap", "overlap_hi", *(f"green{k}_overlap" for k in green_sms)):
            if f"{name}_ms" in row:
                row[f"hidden_{name.removesuffix('_overlap')}"] = (row["serial_ms"] - row[f"{name}_ms"]) / shorter
        print(f"[overlap_probe] {dec}:{count}x{length}:{steps}: decode {row['decode_ms']:.1f} ms, prefill "
              f"{row['prefill_ms']:.1f}, serial {row['serial_ms']:.1f}, overlap {row['overlap_ms']:.1f} "
              f"(hidden {row['hidden_overlap']:.2f}), high-priority decode {row['overlap_hi_ms']:.1f} "
              f"(hidden {row['hidden_overlap_hi']:.2f})", flush=True)
        for k in green_sms:
            if f"green{k}_overlap_ms" in row:
                print(f"[overlap_probe]   green {k} SMs: decode alone {row[f'green{k}_decode_ms']:.1f} ms, prefill alone "
                      f"{row[f'green{k}_prefill_ms']:.1f}, both {row[f'green{k}_overlap_ms']:.1f} "
                      f"(hidden {row[f'hidden_green{k}']:.2f})"
                      + (f", beside a prefill on every SM {row[f'green{k}_fullprefill_ms']:.1f}"
                         if f"green{k}_fullprefill_ms" in row else ""), flush=True)
        rows.append(row)
    save_json(args.out, script_result("overlap_probe", args.model, device, compiled=not args.no_compile,
                                      state="float32", rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
