"""One-row matrix-vector kernels timed at the 7B's decode shapes (one CUDA GPU).

For each projection of a batch-1 decode step (y [N] = W [N, K] @ x [K], bf16) it times cuBLAS
(`F.linear`) and every tiling of the two `ops.triton.row_linear` kernels with the L2 flushed
before each call (`triton.testing.do_bench`), and reports the achieved GB/s of the weight bytes.
Then, closer to a real step, it replays as one CUDA graph the projections of all 32 blocks and the
head, each block with weights of its own (13.3 GB, so nothing stays in L2 between layers): once
with cuBLAS and once with each shape's fastest tiling, and reports both step times.

    python bench/gemv_sweep.py [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton

from fast_xlstm.ops.triton.row_linear import row_linear

SHAPES = {  # the 7B's one-row projections, (N, K): fused q|k|v|o, out, fused gate|up, down, head
    "qkvo": (12288, 4096), "out": (4096, 4096), "up_gate": (21888, 4096), "down": (4096, 10944),
    "head": (50304, 4096)}
BLOCK_SHAPES = ("qkvo", "out", "up_gate", "down")
LAYERS = 32


def tilings(quick: bool) -> list[dict]:
    fma = [dict(kind="fma", bn=bn, bk=bk, warps=w, stages=1)
           for bn, bk, w in itertools.product((2, 4, 8, 16), (256, 512, 1024), (4, 8))]
    dot = [dict(kind="dot", bn=bn, bk=bk, warps=4, stages=s)
           for bn, bk, s in itertools.product((64, 128), (64, 128, 256), (3, 4, 6))]
    if quick:
        return fma[:2] + dot[:2]
    return fma + dot


def graph_ms(fn, reps: int = 20) -> float:
    """Best-of-5 mean time of one replay of `fn` captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="four tilings only (plumbing check)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
              "shapes": {}}
    best_cfg = {}
    for name, (N, K) in SHAPES.items():
        w = (torch.randn(N, K, device=dev) / K ** 0.5).bfloat16()
        x = torch.randn(1, K, device=dev).bfloat16()
        ref = (x.double() @ w.double().T)
        gb = N * K * 2 / 1e9
        rows = {"cublas": {"us": 1e3 * triton.testing.do_bench(lambda: F.linear(x, w), warmup=10, rep=50)}}
        for cfg in tilings(args.quick):
            key = "{kind}:bn{bn}:bk{bk}:w{warps}:s{stages}".format(**cfg)
            try:
                y = row_linear(x, w, **cfg)
                err = float((y.double() - ref).abs().max() / ref.abs().max())
                us = 1e3 * triton.testing.do_bench(lambda: row_linear(x, w, **cfg), warmup=10, rep=50)
                rows[key] = {"us": us, "rel_err": err}
            except Exception as e:  # a tiling that does not compile (e.g. out of shared memory) is skipped
                rows[key] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        for r in rows.values():
            if "us" in r:
                r["gb_s"] = gb / r["us"] * 1e6
        ok = {k: r for k, r in rows.items() if k != "cublas" and "us" in r and r["rel_err"] < 1e-2}
        best = min(ok, key=lambda k: ok[k]["us"])
        best_cfg[name] = dict(zip(("kind", "bn", "bk", "warps", "stages"),
                                  [best.split(":")[0]] + [int(p.lstrip("bnkws")) for p in best.split(":")[1:]]))
        result["shapes"][name] = {"N": N, "K": K, "best": best, "rows": rows}
        top = sorted(ok, key=lambda k: ok[k]["us"])[:5]
        print(f"{name} N={N} K={K}: cublas {rows['cublas']['us']:.1f} us {rows['cublas']['gb_s']:.0f} GB/s; "
              + "; ".join(f"{k} {ok[k]['us']:.1f} us {ok[k]['gb_s']:.0f} GB/s" for k in top), flush=True)
        del w
    # a step's projections, every block with its own weights
    ws = {n: [(torch.randn(*SHAPES[n], device=dev) / SHAPES[n][1] ** 0.5).bfloat16() for _ in range(LAYERS)]
          for n in BLOCK_SHAPES}
    head = (torch.randn(*SHAPES["head"], device=dev) / 64).bfloat16()
    xs = {n: torch.randn(1, SHAPES[n][1], device=dev).bfloat16() for n in SHAPES}
    outs = {n: torch.empty(1, SHAPES[n][0], device=dev, dtype=torch.bfloat16) for n in SHAPES}
    total_gb = (sum(SHAPES[n][0] * SHAPES[n][1] for n in BLOCK_SHAPES) * LAYERS + head.numel()) * 2 / 1e9

    def step(use_triton: bool) -> None:
        for i in range(LAYERS):
            for n in BLOCK_SHAPES:
                if use_triton:
                    row_linear(xs[n], ws[n][i], out=outs[n], **best_cfg[n])
                else:
                    torch.mm(xs[n], ws[n][i].T, out=outs[n])
        if use_triton:
            row_linear(xs["head"], head, out=outs["head"], **best_cfg["head"])
        else:
            torch.mm(xs["head"], head.T, out=outs["head"])

    chain = {}
    for label, use in (("cublas", False), ("triton", True)):
        ms = graph_ms(lambda: step(use))
        chain[label] = {"ms": ms, "gb_s": total_gb / ms * 1e3}
    result["step_projections"] = {"weights_gb": total_gb, "tilings": best_cfg, **chain}
    print(f"step projections ({total_gb:.2f} GB): cublas {chain['cublas']['ms']:.3f} ms "
          f"({chain['cublas']['gb_s']:.0f} GB/s), triton {chain['triton']['ms']:.3f} ms "
          f"({chain['triton']['gb_s']:.0f} GB/s)", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
