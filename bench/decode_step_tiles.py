"""`fast-xlstm bench` with a decode kernel's tiling overridden, to compare tilings inside the real decode
step (a kernel benchmark keeps the few state rows in L2, or flushes it before every call: neither is
the step's own state of the caches).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic-step-256-16-4 python bench/decode_step_tiles.py step:256,16,4 \
        bench --stacks ours --decode-batches 1 --sections decode_batch --out OUT
    TORCHINDUCTOR_CACHE_DIR=/tmp/ic-few-32-256-4-5 python bench/decode_step_tiles.py few:32,256,4,5 \
        bench --stacks ours --decode-batches 8 --sections decode_batch --out OUT

The first argument picks the kernel and its tiling: "step:BK,BV,warps" for the mLSTM step kernel at
batch 1 (other batches keep `ops.triton.step._tiles`), "few:BN,BK,warps,stages" for the few-row
projection kernel (`ops.triton.few_rows_linear`, every shape). The rest is the CLI's. Give each
tiling a fresh inductor cache directory: inductor's FX-graph cache would otherwise replay the first
tiling's compiled step.
"""

from __future__ import annotations

import sys

import fast_xlstm.ops.triton.few_rows_linear as few_rows
import fast_xlstm.ops.triton.step as step
from fast_xlstm.cli import main


def override(spec: str) -> None:
    """Applies a tiling spec ("step:256,16,4" or "few:32,256,4,5")."""
    kind, _, numbers = spec.partition(":")
    values = tuple(int(x) for x in numbers.split(",")) if numbers else ()
    if kind == "step" and len(values) == 3:
        default = step._tiles
        step._tiles = lambda B, NH, DK, DV: values if B == 1 else default(B, NH, DK, DV)
    elif kind == "few" and len(values) == 4:
        few_rows.few_rows_tiling = lambda N, K, bm=16: values
    else:
        raise SystemExit(f"expected step:BK,BV,warps or few:BN,BK,warps,stages, got {spec!r}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    override(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
