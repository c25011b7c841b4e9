"""One-row matrix-vector kernels timed at the 7B's decode shapes (one CUDA GPU).

For each projection of a batch-1 decode step (y [N] = W [N, K] @ x [K], bf16) it times cuBLAS
(`F.linear`), the `ops.triton.row_linear` op (its own tiling choice) and every tiling of its kernel
with the L2 flushed before each call (`triton.testing.do_bench`), and reports the achieved GB/s of
the weight bytes. Then, closer to a real step, it replays as one CUDA graph the projections of all
32 blocks and the head, each block with weights of its own (13.3 GB, so nothing stays in L2 between
layers): with cuBLAS, with the op, and with each shape's fastest tiling, and reports the step times.
(The third run, h100-kernels-row-linear/chain-806d7ac.json, also timed the op as programmatic dependent launches, each kernel's
first weight tile loaded before it waits for the previous kernel: 4.63 vs 4.57 ms, since dropped.)
(The first run, bench/results/h100-kernels-row-linear/sweep-de65b61.json, also timed a tensor-core
form of the kernel, since dropped: it was slower on every shape.)

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

from fast_xlstm.ops.triton.row_linear import _row_linear_kernel, row_linear_triton

SHAPES = {  # the 7B's one-row projections, (N, K): fused q|k|v|o, out, fused gate|up, down, head
    "qkvo": (12288, 4096), "out": (4096, 4096), "up_gate": (21888, 4096), "down": (4096, 10944),
    "head": (50304, 4096)}
BLOCK_SHAPES = ("qkvo", "out", "up_gate", "down")
LAYERS = 32


def tilings(quick: bool) -> list[dict]:
    grid = [dict(bn=bn, bk=bk, warps=w) for bn, bk, w in itertools.product((1, 2, 4, 16), (512, 1024, 2048), (4, 8, 16))]
    return grid[:3] if quick else grid


def launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, bn: int, bk: int, warps: int) -> torch.Tensor:
    """The row-linear kernel with an explicit tiling (the op picks its own)."""
    N, K = w.shape
    _row_linear_kernel[(triton.cdiv(N, bn),)](x, w, w, out, N, K=K, BN=bn, BK=bk, HAS_BIAS=False, num_warps=warps)
    return out


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
    ap.add_argument("--quick", action="store_true", help="three tilings only (plumbing check)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda"
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
              "shapes": {}}
    best_cfg = {}
    for name, (N, K) in SHAPES.items():
        w = (torch.randn(N, K, device=dev) / K ** 0.5).bfloat16()
        x = torch.randn(1, K, device=dev).bfloat16()
        out = torch.empty(1, N, device=dev, dtype=torch.bfloat16)
        ref = (x.double() @ w.double().T)
        gb = N * K * 2 / 1e9

        def timed(fn) -> dict:
            err = float((fn().double() - ref).abs().max() / ref.abs().max())
            return {"us": 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50), "rel_err": err}

        rows = {"cublas": timed(lambda: F.linear(x, w)), "op": timed(lambda: row_linear_triton(x, w))}
        for cfg in tilings(args.quick):
            key = "bn{bn}:bk{bk}:w{warps}".format(**cfg)
            try:
                rows[key] = timed(lambda: launch(x, w, out, **cfg))
            except Exception as e:  # a tiling that does not compile (e.g. out of registers) is skipped
                rows[key] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
        for r in rows.values():
            if "us" in r:
                r["gb_s"] = gb / r["us"] * 1e6
        ok = {k: r for k, r in rows.items() if k not in ("cublas", "op") and "us" in r and r["rel_err"] < 1e-2}
        best = min(ok, key=lambda k: ok[k]["us"])
        best_cfg[name] = dict(zip(("bn", "bk", "warps"), (int(p.lstrip("bnkw")) for p in best.split(":"))))
        result["shapes"][name] = {"N": N, "K": K, "best": best, "rows": rows}
        top = sorted(ok, key=lambda k: ok[k]["us"])[:5]
        print(f"{name} N={N} K={K}: " + "; ".join(f"{k} {r['us']:.1f} us {r['gb_s']:.0f} GB/s" for k, r in
                                                   [("cublas", rows["cublas"]), ("op", rows["op"])] + [(k, ok[k]) for k in top]),
              flush=True)
        del w
    # a step's projections, every block with its own weights
    ws = {n: [(torch.randn(*SHAPES[n], device=dev) / SHAPES[n][1] ** 0.5).bfloat16() for _ in range(LAYERS)]
          for n in BLOCK_SHAPES}
    ws["head"] = [(torch.randn(*SHAPES["head"], device=dev) / 64).bfloat16()]
    xs = {n: torch.randn(1, SHAPES[n][1], device=dev).bfloat16() for n in SHAPES}
    outs = {n: torch.empty(1, SHAPES[n][0], device=dev, dtype=torch.bfloat16) for n in SHAPES}
    total_gb = (sum(SHAPES[n][0] * SHAPES[n][1] for n in BLOCK_SHAPES) * LAYERS + ws["head"][0].numel()) * 2 / 1e9
    order = [(n, i) for i in range(LAYERS) for n in BLOCK_SHAPES] + [("head", 0)]
    kinds = {"cublas": lambda n, i: torch.mm(xs[n], ws[n][i].T, out=outs[n]),
             "op": lambda n, i: row_linear_triton(xs[n], ws[n][i]),
             "best_tilings": lambda n, i: launch(xs[n], ws[n][i], outs[n], **best_cfg[n])}
    chain = {}
    for label, one in kinds.items():
        ms = graph_ms(lambda: [one(n, i) for n, i in order])
        chain[label] = {"ms": ms, "gb_s": total_gb / ms * 1e3}
    result["step_projections"] = {"weights_gb": total_gb, "tilings": best_cfg, **chain}
    print(f"step projections ({total_gb:.2f} GB): " + ", ".join(f"{k} {v['ms']:.3f} ms ({v['gb_s']:.0f} GB/s)"
                                                               for k, v in chain.items()), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
