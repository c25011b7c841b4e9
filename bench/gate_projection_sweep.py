"""The fp32 gate projection kernel's tilings timed at the 7B shape (one CUDA GPU).

x [M, 4096] bf16 @ w [16, 4096].T fp32 for prefill row counts M, for each (rows per program, input-feature
splits) pair, next to the fp32 GEMM on an fp32 copy of x (what the kernel replaced), with the achieved
GB/s of x's bytes. Module constants are patched per pair (eager calls read them each time).

    python bench/gate_projection_sweep.py [--rows 2048 65536] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from fast_xlstm.ops.triton import gate_projection as gp

K, N = 4096, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[64, 512, 2048, 16384, 65536])
    ap.add_argument("--tilings", default="32:1,64:1,32:2,64:2,64:4,64:8,128:4",
                    help="comma list of ROWS:SPLITS (SPLITS ignored by kernels without a split)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N, K, device="cuda", generator=g) / K ** 0.5
    b = torch.randn(N, device="cuda", generator=g)
    rows = []
    for M in args.rows:
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        ref = x.double() @ w.double().T + b.double()
        row = {"rows": M, "fp32_gemm_ms": triton.testing.do_bench(
            lambda: torch.nn.functional.linear(x.float(), w, b), warmup=5, rep=40), "tilings": {}}
        for spec in args.tilings.split(","):
            bm, splits = (int(v) for v in spec.split(":"))
            gp._ROWS_PER_PROGRAM = bm
            if hasattr(gp, "_K_SPLITS"):
                gp._K_SPLITS = splits
            y = gp.gate_projection_triton(x, w, b)
            err = float((y.double() - ref).abs().max() / ref.abs().max())
            ms = triton.testing.do_bench(lambda: gp.gate_projection_triton(x, w, b), warmup=5, rep=40)
            row["tilings"][spec] = {"ms": ms, "gb_s": M * K * 2 / ms / 1e6, "rel_err": err}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "commit": os.environ.get("FAST_XLSTM_COMMIT", "unknown"),
                       "K": K, "N": N, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
