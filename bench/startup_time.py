"""Start-up time of a compiled engine, as `fast-xlstm serve --compile` pays it: build the model and
engine (`LLM(..., compile_decode=True, compile_prefill=True)`), then `engine.warm_up()` (decode graphs
of every batch bucket, graph prefills, kernel compiles).

`--cold` points inductor's and Triton's on-disk caches at a fresh directory first, so every kernel
compiles and every autotuning benchmark runs, as on a fresh machine; without it, whatever earlier
runs left in the caches is reused (a restart).

    python bench/startup_time.py [--model xlstm-7b] [--cold] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--cold", action="store_true", help="empty compile caches (a fresh machine's start)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cold:  # before torch is imported: inductor and Triton read these when they first cache
        cache = tempfile.mkdtemp(prefix="fast-xlstm-startup-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cache, "inductor")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    t0 = time.perf_counter()
    from fast_xlstm.llm import LLM

    llm = LLM(args.model, device=args.device, max_num_seqs=args.max_num_seqs, compile_decode=True,
              compile_prefill=True)
    build = time.perf_counter() - t0
    warm = llm.engine.warm_up()
    result = {"model": args.model, "device": str(llm.model.device), "cold": args.cold,
              "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"), "build_s": build, "warm_up_s": warm}
    print(f"{args.model} on {llm.model.device}: build {build:.1f} s, warm-up {warm:.1f} s"
          f"{' (empty compile caches)' if args.cold else ''}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
