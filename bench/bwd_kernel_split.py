"""The chunkwise backward timed whole, and again with each of its kernels' launch configs swapped in.

At the 7B head shapes (NH 8, DK 256, DV 512, bf16 q/k/v, fp32 gates) over B x S = 65,536 tokens per
call, as training runs it: the forward keeps the chunk-start states (--recompute: the backward re-runs the
states kernel) and the loss uses h alone. The backward runs the reverse state-gradient recurrence
(`_bwd_dstate_kernel`: sequential over chunks, parallel over sequences, heads and tiles, like the
forward's states kernel) and the two chunk-parallel kernels (dq/dk and dv), plus torch glue for the
gate gradients. Each row: the whole backward with the configs it picks, then with one kernel's
config replaced by each candidate (the differences are that kernel's share).

    python bench/bwd_kernel_split.py [--contexts 512 8192 65536] [--out FILE.json]
    python bench/bwd_kernel_split.py --profile   # device time per kernel of one backward, no sweep
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from fwd_kernel_split import NH, TOKENS, random_inputs, write_rows  # (bench/ is the script's folder)

from fast_xlstm.ops.triton import _common, chunkwise_bwd, chunkwise_fwd
from fast_xlstm.ops.triton._common import chunk_len, seq_tables

DSTATE = [dict(BK=64, BV=64, num_warps=4, num_stages=2), dict(BK=64, BV=128, num_warps=8, num_stages=3),
          dict(BK=64, BV=256, num_warps=8, num_stages=3), dict(BK=128, BV=128, num_warps=8, num_stages=3),
          dict(BK=32, BV=128, num_warps=4, num_stages=3)]
PAR = {"k": [dict(BK=64, BV=64, num_warps=8, num_stages=2), dict(BK=128, BV=64, num_warps=8, num_stages=2),
             dict(BK=64, BV=128, num_warps=8, num_stages=2), dict(BK=64, BV=64, num_warps=4, num_stages=2),
             dict(BK=64, BV=64, num_warps=8, num_stages=3)],
       "v": [dict(BK=64, BV=128, num_warps=8, num_stages=2), dict(BK=64, BV=256, num_warps=8, num_stages=2),
             dict(BK=128, BV=128, num_warps=8, num_stages=2), dict(BK=64, BV=64, num_warps=8, num_stages=2),
             dict(BK=64, BV=128, num_warps=8, num_stages=3)]}


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=30))


def profile_kernels(fn, calls: int = 10) -> dict[str, float]:
    """Device milliseconds per call of `fn`, by kernel name (torch.profiler over `calls` calls)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us > 0 and ev.key and not ev.key.startswith("ProfilerStep"):
            per[ev.key[:90]] = per.get(ev.key[:90], 0.0) + us / 1000.0 / calls
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 8192, 65536])
    ap.add_argument("--batch", type=int, default=None, help="sequences per call (default: 65,536 tokens / context)")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--recompute", action="store_true", help="the backward re-runs the states kernel")
    ap.add_argument("--profile", action="store_true", help="per-kernel device time of one backward instead of a sweep")
    args = ap.parse_args()
    rows = []
    orig_dstate, orig_par = chunkwise_bwd._dstate_cfgs, chunkwise_bwd._par_cfgs
    for S in args.contexts:
        B = args.batch or TOKENS // S
        L = chunk_len(args.chunk, S)
        q, k, v, i, f = random_inputs(B, S, S)
        tabs = seq_tables(B, NH, S, L, None, q.device)
        # As training runs it: the forward keeps the rows (and, unless --recompute, the chunk states), and a
        # loss on h alone leaves the final state's gradients None.
        h, final, dsum, kept_rows, kept_states = chunkwise_fwd.mlstm_chunkwise_fwd_train(
            q, k, v, i, f, None, tabs, L, 1e-6, keep_states=not args.recompute)
        dh = torch.randn_like(h)

        def bwd():
            chunkwise_bwd.mlstm_chunkwise_bwd(q, k, v, i, f, None, h, dsum, final, dh, None, None, None, tabs, L,
                                              1e-6, rows=kept_rows, states=kept_states)

        if args.profile:
            per = profile_kernels(bwd)
            row = {"context": S, "batch": B, "L": L, "recompute": args.recompute, "bwd_ms": _time(bwd), "kernels_ms": per,
                   "kernels_total_ms": sum(per.values())}
            print(json.dumps(row), flush=True)
            for name, ms in per.items():
                print(f"  {ms:8.3f} ms  {name}")
            rows.append(row)
            continue
        _common._CHOSEN.clear()
        row = {"context": S, "batch": B, "L": L, "recompute": args.recompute, "fwd_ms": _time(
            lambda: chunkwise_fwd.mlstm_chunkwise_fwd(q, k, v, i, f, None, tabs, L, 1e-6)), "bwd_ms": _time(bwd),
            "bwd_ms_dstate": {}, "bwd_ms_par_k": {}, "bwd_ms_par_v": {}}
        for cfg in DSTATE:
            _common._CHOSEN.clear()
            chunkwise_bwd._dstate_cfgs = lambda *_, cfg=cfg: [cfg]
            row["bwd_ms_dstate"][json.dumps(cfg)] = _time(bwd)
        chunkwise_bwd._dstate_cfgs = orig_dstate
        for wide in ("k", "v"):
            for cfg in PAR[wide]:
                _common._CHOSEN.clear()
                chunkwise_bwd._par_cfgs = (lambda dk, dv, l, w, cfg=cfg, wide=wide:
                                           [cfg] if w == wide else orig_par(dk, dv, l, w))
                row[f"bwd_ms_par_{wide}"][json.dumps(cfg)] = _time(bwd)
            chunkwise_bwd._par_cfgs = orig_par
        _common._CHOSEN.clear()
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, i, f, h, dsum, final, dh
    if args.out:
        write_rows(args.out, rows)


if __name__ == "__main__":
    main()
