"""Where a served load's time went, from the engine's step log (`fast-xlstm serve --step-log FILE`).

For each load JSON written by bench/serve_gpu.py (it records the load's wall-clock window), takes
the steps inside the window and prints: steps with prefill (count, seconds, tokens, tok/s), pure
decode steps (count, seconds, mean batch, mean ms per step at the most common batch), and the time
the engine sat idle between steps, decode stalls (intervals between decode steps at that batch more
than 3 ms over their median) and the time spent in garbage collection (logs that record it).

Usage: python bench/step_log_summary.py STEPS.jsonl[.gz] LOAD.json [LOAD.json ...]
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path


def summarize(steps: list[dict], window: tuple[float, float]) -> dict:
    start, end = window
    w = [s for s in steps if start <= s["time"] <= end]
    prefill = [s for s in w if s["prefill_tokens"]]
    decode = [s for s in w if not s["prefill_tokens"] and s["decode"]]
    batch = Counter(s["decode"] for s in decode).most_common(1)
    top = batch[0][0] if batch else 0
    at_top = [s["ms"] for s in decode if s["decode"] == top]
    # A step's line is written when it ends; the gap before it is what the step did not cover.
    idle = sum(max(0.0, b["time"] - a["time"] - b["ms"] / 1e3) for a, b in zip(w, w[1:]))
    # Stalls: intervals between consecutive decode steps at that batch (no prefill in either) more
    # than 3 ms over their median; the excess is device time the host failed to keep busy.
    gaps = [1e3 * (b["time"] - a["time"]) for a, b in zip(w, w[1:])
            if not a["prefill_tokens"] and not b["prefill_tokens"] and a["decode"] == b["decode"] == top]
    median = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    slow = [g - median for g in gaps if g > median + 3]
    pre_s = sum(s["ms"] for s in prefill) / 1e3
    pre_tok = sum(s["prefill_tokens"] for s in prefill)
    return {"steps": len(w), "prefill_steps": len(prefill), "prefill_s": pre_s, "prefill_tokens": pre_tok,
            "prefill_tok_s": pre_tok / pre_s if pre_s else None, "decode_steps": len(decode),
            "decode_s": sum(s["ms"] for s in decode) / 1e3,
            "decode_mean_batch": sum(s["decode"] for s in decode) / len(decode) if decode else 0,
            "most_common_batch": top, "ms_per_step_at_that_batch": sum(at_top) / len(at_top) if at_top else None,
            "idle_between_steps_s": idle, "decode_interval_median_ms": median, "slow_decode_intervals": len(slow),
            "slow_decode_excess_s": sum(slow) / 1e3,
            "gc_s": sum(s.get("gc_ms", 0.0) for s in w) / 1e3}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    path = Path(argv[0])
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    steps = [json.loads(line) for line in text.splitlines() if line.strip()]
    for load in argv[1:]:
        data = json.loads(Path(load).read_text())
        if "window_unix_s" not in data:
            print(f"{load}: no window_unix_s (not written by bench/serve_gpu.py)", file=sys.stderr)
            return 2
        s = summarize(steps, tuple(data["window_unix_s"]))
        print(f"{load}: {data['output_throughput_tok_s']:.0f} output tok/s over {data['duration_s']:.1f} s "
              "(the window includes warm-up requests)")
        print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
