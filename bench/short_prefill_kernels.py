"""The chunkwise mLSTM forward of a short prompt piece from a pool state, per launch config (one CUDA GPU).

A prefix-cache hit prefills a few tokens (64 in the serve benchmark's TTFT comparison) from a cached
state: per layer, the states kernel reads the pool row and writes the chunk-start and final states, and
the output kernel computes h and copies the final state back into the pool. With one sequence and 8
heads both launch few programs, so their time is set by how many SMs share the state traffic, not by
the arithmetic. This times `mlstm_chunkwise_planned` as the graph prefill calls it (7B head shapes,
layout of one sequence of TOKENS tokens, state rows and final state in the pool), 32 calls (one per
layer) captured in one CUDA graph, for each pair of states-kernel and output-kernel configs, and checks
that every config gives the same h and final state as the first (bitwise).

    python bench/short_prefill_kernels.py [--tokens 16 64 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton

from fast_xlstm.ops.triton import _common, chunkwise_fwd
from fast_xlstm.ops.triton.planned import PackedLayout, PackedPlan, mlstm_chunkwise_planned, plan_values

NH, DK, DV, LAYERS, CHUNK = 8, 256, 512, 32, 64
STATE_CFGS = {"states 64x128 w8": dict(BK=64, BV=128, num_warps=8, num_stages=3),
              "states 64x64 w4": dict(BK=64, BV=64, num_warps=4, num_stages=2),
              "states 64x32 w4": dict(BK=64, BV=32, num_warps=4, num_stages=1)}
OUT_CFGS = {"out BV128 w8": dict(BK=64, BV=128, num_warps=8, num_stages=2),
            "out BV64 w8": dict(BK=64, BV=64, num_warps=8, num_stages=2),
            "out BV64 w4": dict(BK=64, BV=64, num_warps=4, num_stages=2),
            "out BV32 w4": dict(BK=64, BV=32, num_warps=4, num_stages=2)}


def timed(tokens: int, state_cfg: dict | None, out_cfg: dict | None, seed: int = 0):
    """(microseconds per layer, h, pool C row) for one config pair (None: the configs the code picks)."""
    orig = chunkwise_fwd._state_cfgs, chunkwise_fwd._out_cfgs
    if state_cfg is not None:
        chunkwise_fwd._state_cfgs = lambda *_: [state_cfg]
    if out_cfg is not None:
        chunkwise_fwd._out_cfgs = lambda *_: [out_cfg]
    _common._CHOSEN.clear()
    try:
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k = (torch.randn(1, NH, tokens, DK, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
        v = torch.randn(1, NH, tokens, DV, device="cuda", generator=g, dtype=torch.bfloat16)
        i = torch.randn(1, NH, tokens, device="cuda", generator=g)
        f = torch.randn(1, NH, tokens, device="cuda", generator=g) + 3.0
        pool = (torch.randn(4, NH, DK, DV, device="cuda", generator=g), torch.randn(4, NH, DK, device="cuda", generator=g),
                torch.randn(4, NH, 1, device="cuda", generator=g))
        start = tuple(t.clone() for t in pool)
        rows = torch.tensor([2], device="cuda")
        layout = PackedLayout(1, tokens, CHUNK)
        plan = PackedPlan.from_buffer(layout, torch.tensor(plan_values(layout, [0, tokens]), device="cuda"))

        def one():
            return mlstm_chunkwise_planned(q, k, v, i, f, pool, plan, state_rows=rows, final_to_pool=True)[0]

        h = one().clone()  # compiles; the first call's outputs are the ones compared
        row = pool[0][2].clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(LAYERS):
                one()
        ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100)
        for t, s in zip(pool, start):
            t.copy_(s)
        return 1e3 * ms / LAYERS, h, row
    finally:
        chunkwise_fwd._state_cfgs, chunkwise_fwd._out_cfgs = orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[16, 64, 128])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for tokens in args.tokens:
        us, h0, c0 = timed(tokens, None, None)
        picked = {"state": chunkwise_fwd._state_cfgs(DK, DV, NH),
                  "out": chunkwise_fwd._out_cfgs(DK, DV, _common.chunk_len(CHUNK, tokens),
                                                 PackedLayout(1, tokens, CHUNK).max_chunks * NH)[0]}
        rows.append({"tokens": tokens, "configs": "picked", "us_per_layer": us, "picked": picked})
        print(f"{tokens:5d} tokens  picked ({picked['out']})  {us:7.2f} us per layer", flush=True)
        for (sn, sc), (on, oc) in itertools.product(STATE_CFGS.items(), OUT_CFGS.items()):
            us, h, c = timed(tokens, sc, oc)
            same = bool(torch.equal(h, h0) and torch.equal(c, c0))
            rows.append({"tokens": tokens, "configs": f"{sn} / {on}", "us_per_layer": us, "same_as_picked": same})
            print(f"{tokens:5d} tokens  {sn} / {on}  {us:7.2f} us per layer  same outputs: {same}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
