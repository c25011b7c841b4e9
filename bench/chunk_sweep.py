"""Whole chunkwise forward (inference) at 64- vs 128-token chunks, one and two sequences (one CUDA GPU).

At the 7B head shapes (NH 8, DK 256, DV 512, bf16 q/k/v, fp32 gates). Shows where the chunk length that
`fast_xlstm.ops.triton.autograd` picks for inference on few sequences pays off.

    python bench/chunk_sweep.py OUT.json      (run from bench/ or with bench/ on PYTHONPATH)
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from fwd_kernel_split import random_inputs  # (bench/ is the script's folder)

from fast_xlstm.ops.triton import autograd, mlstm_chunkwise_triton


def main(out: str) -> None:
    autograd.LONG_ALONE = 1 << 62  # time the requested chunk sizes, not the automatic choice
    rows = []
    for B in (1, 2):
        for S in (4096, 8192, 16384, 32768, 65536):
            if B * S > 65536:
                continue
            q, k, v, i, f = random_inputs(B, S, S)
            row = {"batch": B, "context": S}
            with torch.no_grad():
                for c in (64, 128):
                    row[f"L{c}_ms"] = triton.testing.do_bench(
                        lambda: mlstm_chunkwise_triton(q, k, v, i, f, chunk_size=c), warmup=10, rep=50)
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
