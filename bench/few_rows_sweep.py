"""The few-row tensor-core kernel timed at the 7B's decode shapes for small batches (one CUDA GPU).

For each batch M in --rows and each projection of a decode step (Y [M, N] = X [M, K] @ W [N, K]^T,
bf16) it times cuBLAS (`F.linear`), the `ops.triton.few_rows_linear` op (its own tiling) and each
tiling of its kernel, with the L2 flushed before each call (`triton.testing.do_bench`), and reports
the achieved GB/s of the weight bytes. Then, closer to a real step, it replays as one CUDA graph the
projections of all 32 blocks and the head, each block with weights of its own (13.3 GB, nothing
stays in L2): with cuBLAS, with the op, and with each shape's fastest tiling.

    python bench/few_rows_sweep.py [--rows 2,4,8,16,32,64] [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton

from fast_xlstm.ops.triton.few_rows_linear import _few_rows_linear_kernel, few_rows_linear_triton
from gemv_sweep import BLOCK_SHAPES, LAYERS, SHAPES, graph_ms


def tilings(m: int, quick: bool) -> list[dict]:
    """Tilings for m rows: every tile height that holds them; at 16 rows and fewer, the 16-row tiles
    with a wider grid (the sweep that chose the 2-16-row default)."""
    if m <= 16:
        grid = [dict(bm=16, bn=bn, bk=bk, warps=w, stages=s)
                for bn, bk, (w, s) in itertools.product((16, 32, 64), (128, 256, 512), ((4, 3), (4, 5), (8, 4)))]
    else:
        grid = [dict(bm=bm, bn=bn, bk=bk, warps=w, stages=s)
                for bm, bn, bk, (w, s) in itertools.product([b for b in (32, 64) if b >= m], (32, 64), (64, 128, 256),
                                                             ((4, 3), (4, 4), (8, 3), (8, 4)))]
    return grid[:2] if quick else grid


def launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bm: int, bn: int, bk: int, warps: int, stages: int):
    """The few-row kernel with an explicit tiling (the op picks its own)."""
    (M, K), N = x.shape, w.shape[0]
    _few_rows_linear_kernel[(triton.cdiv(N, bn),)](x, w, w, out, M, N, x.stride(0), K=K, BM=bm, BN=bn, BK=bk,
                                                   HAS_BIAS=False, IN_DT=triton.language.bfloat16,
                                                   DOT_DT=triton.language.bfloat16, num_warps=warps,
                                                   num_stages=stages)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2,4,8,16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="two tilings only (plumbing check)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
              "rows": {}}
    for m in (int(r) for r in args.rows.split(",")):
        shapes, best_cfg = {}, {}
        for name, (N, K) in SHAPES.items():
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
            x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, N, device=dev, dtype=torch.bfloat16)
            gb = w.numel() * 2 / 1e9
            row = {"N": N, "K": K, "weight_gb": gb}
            ref = F.linear(x, w)
            row["cublas_us"] = 1e3 * triton.testing.do_bench(lambda: F.linear(x, w))
            row["op_us"] = 1e3 * triton.testing.do_bench(lambda: few_rows_linear_triton(x, w))
            err = ((few_rows_linear_triton(x, w).float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            row["op_rel_err_vs_cublas"] = err
            row["tilings"] = []
            for cfg in tilings(m, args.quick):
                try:
                    us = 1e3 * triton.testing.do_bench(lambda: launch(x, w, out, **cfg))
                except Exception as e:  # a tiling that does not fit the SM's shared memory
                    row["tilings"].append({**cfg, "error": type(e).__name__})
                    continue
                row["tilings"].append({**cfg, "us": us, "gb_s": gb / (us * 1e-6)})
            ok = [t for t in row["tilings"] if "us" in t]
            best = min(ok, key=lambda t: t["us"])
            best_cfg[name] = {k: best[k] for k in ("bm", "bn", "bk", "warps", "stages")}
            row["best"] = best
            row["cublas_gb_s"] = gb / (row["cublas_us"] * 1e-6)
            row["op_gb_s"] = gb / (row["op_us"] * 1e-6)
            print(f"[few_rows] M={m} {name} {N}x{K}: cuBLAS {row['cublas_us']:.1f} us ({row['cublas_gb_s']:.0f} GB/s), "
                  f"op {row['op_us']:.1f} ({row['op_gb_s']:.0f}), best {best['us']:.1f} ({best['gb_s']:.0f}) "
                  f"{best_cfg[name]}", flush=True)
            shapes[name] = row
            w = None  # frees the weight before the next shape
        # one step's projections: every block with weights of its own, then the head
        weights = [(name, torch.randn(*SHAPES[name], device=dev, dtype=torch.bfloat16)) for _ in range(LAYERS)
                   for name in BLOCK_SHAPES] + [("head", torch.randn(*SHAPES["head"], device=dev, dtype=torch.bfloat16))]
        xs = {name: torch.randn(m, K, device=dev, dtype=torch.bfloat16) for name, (_, K) in SHAPES.items()}
        outs = {name: torch.empty(m, N, device=dev, dtype=torch.bfloat16) for name, (N, _) in SHAPES.items()}
        total_gb = sum(w.numel() for _, w in weights) * 2 / 1e9
        chain = {}
        for label, fn in (("cublas", lambda n, w: F.linear(xs[n], w)),
                          ("op", lambda n, w: few_rows_linear_triton(xs[n], w)),
                          ("best_tilings", lambda n, w: launch(xs[n], w, outs[n], **best_cfg[n]))):
            ms = graph_ms(lambda: [fn(n, w) for n, w in weights])
            chain[label] = {"ms": ms, "gb_s": total_gb / (ms * 1e-3)}
        print(f"[few_rows] M={m} step projections as one graph ({total_gb:.1f} GB): "
              + ", ".join(f"{k} {v['ms']:.3f} ms ({v['gb_s']:.0f} GB/s)" for k, v in chain.items()), flush=True)
        weights = None  # frees 13.3 GB before the next row count
        torch.cuda.empty_cache()
        result["rows"][str(m)] = {"shapes": shapes, "best_tilings": best_cfg, "graph": chain}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
