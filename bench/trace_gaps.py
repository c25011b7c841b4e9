"""Where a GPU sits idle, and why: idle gaps in a torch.profiler (Kineto) chrome trace, each blamed on
what the host was doing when the device ran dry.

A gap is time inside the traced window when no kernel, memcpy or memset runs on any stream. It is
blamed on
- a host sync, when a synchronising runtime call (`cudaStreamSynchronize`, `cudaDeviceSynchronize`,
  `cudaEventSynchronize`, a blocking `cudaMemcpy`, or a pageable `cudaMemcpyAsync` device-to-host) was
  waiting at the gap's start: the host waited for the queue to drain, then had to refill it.
  Label: "sync: <innermost op around the call>";
- otherwise the launch that ended the gap (the host was slower than the device there).
  Label: "launch: <innermost op around the launch>".
Either label gets " @ <innermost annotation>" (record_function ranges such as FSDP's) when one
encloses the call.

    python bench/trace_gaps.py trace.json [--min-gap-us 20] [--top 20]
"""

from __future__ import annotations

import argparse
import bisect
import json
from pathlib import Path

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cuMemcpy")  # blocking copies and explicit syncs


class _Spans:
    """Host spans (cpu ops or annotations) of one thread, for 'what encloses time t' queries."""

    def __init__(self, events: list[dict]):
        self.events = sorted(events, key=lambda e: e["ts"])
        self.starts = [e["ts"] for e in self.events]

    def innermost(self, t: float, window: int = 20000) -> str | None:
        """The latest-starting span that contains t (the innermost of nested spans)."""
        i = bisect.bisect_right(self.starts, t) - 1
        for j in range(i, max(-1, i - window), -1):
            e = self.events[j]
            if e["ts"] + e.get("dur", 0) >= t:
                return e["name"]
        return None


def _is_sync(event: dict) -> bool:
    name = event["name"]
    if not any(k in name for k in SYNC_CALLS):
        return False
    # An async copy blocks the host only device-to-host (into pageable memory); take those whose
    # duration says they waited.
    return "Async" not in name or event.get("dur", 0) > 50


def idle_gaps(trace: dict | str | Path, min_gap_us: float = 20.0, top: int = 20) -> dict:
    """trace: a chrome-trace dict or file from `prof.export_chrome_trace`. Returns busy and idle ms in
    the window from the first to the last device activity, the gap count, and the `top` labels by
    idle time (label, ms, gaps)."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    device = sorted((e["ts"], e["ts"] + e.get("dur", 0), e) for e in events if e.get("cat") in DEVICE_CATS)
    if not device:
        return {"window_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": 0, "by_cause": []}
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    by_corr = {e.get("args", {}).get("correlation"): e for e in runtime}
    syncs = sorted((e for e in runtime if _is_sync(e)), key=lambda e: e["ts"])
    sync_starts = [e["ts"] for e in syncs]
    threads: dict[object, tuple[_Spans, _Spans]] = {}
    for tid in {e.get("tid") for e in runtime}:
        ops = [e for e in events if e.get("tid") == tid and e.get("cat") == "cpu_op"]
        notes = [e for e in events if e.get("tid") == tid and e.get("cat") == "user_annotation"]
        threads[tid] = (_Spans(ops), _Spans(notes))

    def where(call: dict) -> str:
        ops, notes = threads.get(call.get("tid"), (None, None))
        op = ops.innermost(call["ts"]) if ops else None
        note = notes.innermost(call["ts"]) if notes else None
        label = op or call["name"]
        return f"{label} @ {note}" if note else label

    busy, gaps = 0.0, []
    cur_start, cur_end = device[0][0], device[0][1]
    for start, end, ev in device[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            if start - cur_end >= min_gap_us:
                gaps.append((cur_end, start, ev))
            cur_start = start
        cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    window = max(e for _, e, _ in device) - device[0][0]

    causes: dict[str, list[float]] = {}
    for g0, g1, next_ev in gaps:
        label = None
        i = bisect.bisect_right(sync_starts, g0) - 1
        while i >= 0 and syncs[i]["ts"] + syncs[i].get("dur", 0) < g0 and g0 - syncs[i]["ts"] < 1e6:
            i -= 1  # an earlier, longer sync may still span g0
        if i >= 0 and syncs[i]["ts"] <= g0 <= syncs[i]["ts"] + syncs[i].get("dur", 0):
            label = "sync: " + where(syncs[i])
        else:
            launch = by_corr.get(next_ev.get("args", {}).get("correlation"))
            label = "launch: " + (where(launch) if launch else next_ev["name"][:80])
        acc = causes.setdefault(label, [0.0, 0])
        acc[0] += (g1 - g0) / 1e3
        acc[1] += 1
    ranked = sorted(causes.items(), key=lambda kv: -kv[1][0])[:top]
    idle = sum(g1 - g0 for g0, g1, _ in gaps) / 1e3
    return {"window_ms": window / 1e3, "busy_ms": busy / 1e3, "idle_ms": idle, "gaps": len(gaps),
            "min_gap_us": min_gap_us,
            "by_cause": [{"cause": k, "ms": v[0], "gaps": int(v[1])} for k, v in ranked]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="chrome trace JSON from torch.profiler")
    ap.add_argument("--min-gap-us", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args(argv)
    r = idle_gaps(args.trace, args.min_gap_us, args.top)
    print(f"window {r['window_ms']:.1f} ms: busy {r['busy_ms']:.1f}, idle {r['idle_ms']:.1f} in {r['gaps']} gaps "
          f">= {args.min_gap_us:g} us")
    for row in r["by_cause"]:
        print(f"  {row['ms']:8.2f} ms  {row['gaps']:5d}x  {row['cause']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
