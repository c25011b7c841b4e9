"""`fast-xlstm bench` with the decode step kernel's batch-1 tiles overridden, to compare tilings inside
the real decode step (a kernel benchmark keeps the few state rows in L2, so it times latency only).

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic-256-16-4 python bench/decode_step_tiles.py 256,16,4 \
        bench --stacks ours --decode-batches 1 --sections decode_batch --out OUT

The first argument is "BK,BV,warps" for batch 1 (other batches keep `ops.triton.step._tiles`); the rest
is the CLI's. Give each tiling a fresh inductor cache directory: inductor's FX-graph cache would
otherwise replay the first tiling's compiled step.
"""

from __future__ import annotations

import sys

import fast_xlstm.ops.triton.step as step
from fast_xlstm.cli import main


def override(spec: str) -> None:
    """Makes batch-1 steps take the (BK, BV, warps) of `spec` ("256,16,4")."""
    bk, bv, warps = (int(x) for x in spec.split(","))
    default = step._tiles
    step._tiles = lambda B, NH, DK, DV: (bk, bv, warps) if B == 1 else default(B, NH, DK, DV)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    override(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
