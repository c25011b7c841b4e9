"""The chunkwise forward's two kernels timed apart, per context and launch config (one CUDA GPU).

At the 7B head shapes (NH 8, DK 256, DV 512, bf16 q/k/v, fp32 gates) over B x S = 65,536 tokens per
call: `_fwd_states_kernel` (sequential over a sequence's chunks, parallel over sequences, heads and
state tiles) and `_fwd_out_kernel` (parallel over chunks), as the forward runs them, for each config
in their config lists (and a few more), plus the whole forward with the configs it picks.
Long contexts leave few sequences, so the states kernel's parallelism is what changes with context:
this shows which tiles keep the GPU busy there.

    python bench/fwd_kernel_split.py [--contexts 512 8192 65536] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from fast_xlstm.ops.triton import _common, chunkwise_fwd
from fast_xlstm.ops.triton._common import chunk_len, seq_tables

NH, DK, DV, TOKENS = 8, 256, 512, 65536


def random_inputs(B: int, S: int, seed: int):
    """q, k [B, NH, S, DK], v [B, NH, S, DV] bf16 and gate pre-activations i, f [B, NH, S] fp32 on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, NH, S, DK, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, NH, S, DV, device="cuda", generator=g, dtype=torch.bfloat16)
    i = torch.randn(B, NH, S, device="cuda", generator=g)
    f = torch.randn(B, NH, S, device="cuda", generator=g) + 3.0
    return q, k, v, i, f


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[512, 2048, 8192, 32768, 65536])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=None, help="sequences per call (default: 65,536 tokens / context)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--states-only", action="store_true", help="only the states kernel, only --state-cfgs")
    ap.add_argument("--state-cfgs", default=None, help="JSON list of states-kernel configs to time instead")
    args = ap.parse_args()
    # The kernel's own list first, then other tilings worth knowing about.
    state_cfgs = chunkwise_fwd._state_cfgs(DK, DV) + [
        dict(BK=32, BV=64, num_warps=4, num_stages=2), dict(BK=64, BV=32, num_warps=4, num_stages=2),
        dict(BK=32, BV=32, num_warps=2, num_stages=2), dict(BK=64, BV=64, num_warps=8, num_stages=2),
        dict(BK=16, BV=64, num_warps=2, num_stages=2), dict(BK=64, BV=128, num_warps=4, num_stages=2),
        dict(BK=64, BV=128, num_warps=8, num_stages=2), dict(BK=128, BV=64, num_warps=4, num_stages=2),
        dict(BK=128, BV=64, num_warps=8, num_stages=2), dict(BK=128, BV=128, num_warps=8, num_stages=2),
        dict(BK=64, BV=128, num_warps=4, num_stages=3)]
    if args.state_cfgs:
        state_cfgs = json.loads(args.state_cfgs)
    orig_states = chunkwise_fwd._state_cfgs
    rows = []
    for S in args.contexts:
        B = args.batch or TOKENS // S
        L = chunk_len(args.chunk, S)
        q, k, v, i, f = random_inputs(B, S, S)
        tabs = seq_tables(B, NH, S, L, None, q.device)
        sd = chunkwise_fwd.chunk_state_dtype(q.dtype)
        row = {"context": S, "batch": B, "L": L, "states_ms": {}, "out_ms": {}}
        for cfg in state_cfgs:
            _common._CHOSEN.clear()
            chunkwise_fwd._state_cfgs = lambda dk, dv, *_, cfg=cfg: [cfg]
            row["states_ms"][json.dumps(cfg)] = _time(
                lambda: chunkwise_fwd.run_states(k, v, i, f, None, tabs, L, sd, rows=False))
        chunkwise_fwd._state_cfgs = orig_states
        _common._CHOSEN.clear()
        row["fwd_ms"] = _time(lambda: chunkwise_fwd.mlstm_chunkwise_fwd(q, k, v, i, f, None, tabs, L, 1e-6))
        if args.states_only:
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        CB, NB, MB, _, _, _ = chunkwise_fwd.run_states(k, v, i, f, None, tabs, L, sd, rows=False)
        out_cfgs = chunkwise_fwd._out_cfgs(DK, DV, L) + [dict(BK=64, BV=64, num_warps=4, num_stages=2),
                                                          dict(BK=64, BV=128, num_warps=8, num_stages=2)]
        orig_out = chunkwise_fwd._out_cfgs
        for cfg in out_cfgs:
            _common._CHOSEN.clear()
            chunkwise_fwd._out_cfgs = lambda *_, cfg=cfg: [cfg]
            row["out_ms"][json.dumps(cfg)] = _time(
                lambda: chunkwise_fwd.run_out(q, k, v, i, CB, NB, MB, None, None, tabs, L, 1e-6, f=f))
        chunkwise_fwd._out_cfgs = orig_out
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, i, f, CB, NB, MB
    if args.out:
        write_rows(args.out, rows)


def write_rows(path: str, rows: list[dict]) -> None:
    """The result file: the card, the commit (FAST_XLSTM_COMMIT), the shape, one row per context."""
    with open(path, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
                   "shape": {"NH": NH, "DK": DK, "DV": DV, "tokens": TOKENS}, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
