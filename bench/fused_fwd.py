"""The one-kernel inference forward (`chunkwise_fused`) against the two-kernel forward, per shape and config.

At the 7B head shapes (NH 8, DK 256, DV 512, bf16 q/k/v, fp32 gates, no initial state) for each B x S:
the two-kernel forward as inference runs it (chunk length from `inference_chunk_len`, token-major h, no
dsum fill), then the fused kernel for each launch config and chunk length, with its agreement to the
two-kernel result (max |diff| / max |ref| of h and of the final C). Achieved rates: the fused kernel's
HBM bytes (q, k, v and gates read once, h written) and its tensor-core FLOPs (the q.k product once per
DV tile, as it runs).

    python bench/fused_fwd.py [--shapes 1x2048 4x16384] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from fast_xlstm.ops.triton import _common, chunkwise_fused, chunkwise_fwd
from fast_xlstm.ops.triton._common import seq_tables
from fast_xlstm.ops.triton.autograd import inference_chunk_len

NH, DK, DV = 8, 256, 512
CONFIGS = [dict(BV=bv, num_warps=w, num_stages=s) for bv in (32, 64) for w in (4, 8) for s in (1, 2)]


def random_inputs(B: int, S: int, seed: int):
    """q, k [B, NH, S, DK], v [B, NH, S, DV] bf16 and gate pre-activations i, f [B, NH, S] fp32 on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, NH, S, DK, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, NH, S, DV, device="cuda", generator=g, dtype=torch.bfloat16)
    i = torch.randn(B, NH, S, device="cuda", generator=g)
    f = torch.randn(B, NH, S, device="cuda", generator=g) + 3.0
    return q, k, v, i, f


def _time(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=30))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def fused_rates(B: int, S: int, L: int, bv: int, ms: float) -> dict:
    tokens = B * S
    hbm = tokens * NH * ((2 * DK + 2 * DV) * 2 + 8)  # q, k, v, h bf16 + i, f fp32
    per_chunk_tile = 2 * L * L * DK + 2 * L * DK * bv * 2 + 2 * L * L * bv  # qk, qC, k^T v, pv
    flop = (tokens / L) * NH * (DV / bv) * per_chunk_tile
    return {"gb_s": hbm / ms / 1e6, "tflop_s": flop / ms / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["1x64", "1x512", "1x2048", "1x16384", "32x2048", "4x16384",
                                                    "1x65536"])
    ap.add_argument("--chunks", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    orig = chunkwise_fused._cfgs
    for shape in args.shapes:
        B, S = (int(x) for x in shape.split("x"))
        q, k, v, i, f = random_inputs(B, S, S + B)
        L0 = inference_chunk_len(64, B, NH, S)
        tabs = seq_tables(B, NH, S, L0, None, q.device)
        _common._CHOSEN.clear()

        def two_kernel():
            return chunkwise_fwd.mlstm_chunkwise_fwd(q, k, v, i, f, None, tabs, L0, 1e-6, zero_fill=False,
                                                     token_major=True)
        h_ref, (c_ref, _, _), _ = two_kernel()
        row = {"shape": shape, "two_kernel": {"L": L0, "ms": _time(two_kernel)}, "fused": []}
        for L in args.chunks:
            tabs_l = seq_tables(B, NH, S, L, None, q.device)
            for cfg in CONFIGS:
                _common._CHOSEN.clear()
                chunkwise_fused._cfgs = lambda dk, dv, sh, cfg=cfg: [cfg]

                def fused():
                    return chunkwise_fused.mlstm_chunkwise_fwd_fused(q, k, v, i, f, None, tabs_l, L, 1e-6,
                                                                     token_major=True)
                try:
                    h, (c, _, _) = fused()
                except Exception as e:  # a config that does not fit this GPU
                    row["fused"].append({"L": L, **cfg, "error": type(e).__name__})
                    continue
                ms = _time(fused)
                row["fused"].append({"L": L, **cfg, "ms": ms, "h_rel": _rel(h, h_ref), "C_rel": _rel(c, c_ref),
                                     **fused_rates(B, S, L, cfg["BV"], ms)})
        chunkwise_fused._cfgs = orig
        _common._CHOSEN.clear()
        row["default_ms"] = _time(lambda: chunkwise_fused.mlstm_chunkwise_fwd_fused(
            q, k, v, i, f, None, tabs, L0, 1e-6, token_major=True))
        ok = [x for x in row["fused"] if "ms" in x]
        best = min(ok, key=lambda x: x["ms"]) if ok else None
        row["best"] = best
        print(json.dumps({"shape": shape, "two_kernel_ms": row["two_kernel"]["ms"], "default_fused_ms": row["default_ms"],
                          "best": best}), flush=True)
        rows.append(row)
        del q, k, v, i, f, h_ref, c_ref
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
                       "shape": {"NH": NH, "DK": DK, "DV": DV}, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
