"""Tiles of the decode step kernel (`ops/triton/step.py`) at the 7B head shape, per batch size.

For each batch and (BK, BV, num_warps) it runs the in-place slot-pool step (`mlstm_step_slots_`, the
one decode uses) and reports the time per launch (`triton.testing.do_bench_cudagraph`) and the largest relative difference of h and the state from the tiles `_tiles` picks now (the
first row of each batch). The state is the same few rows every launch, so it stays in the L2 cache:
the times are the kernel's latency, which is what limits small batches; in a decode step the weights
in between evict it.

    python bench/step_tiles_sweep.py [--batches 1 2 4 8 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from fast_xlstm.ops.triton import step as step_module

CONFIGS = [(64, 32, 2), (64, 32, 4), (128, 32, 4), (256, 32, 4), (256, 32, 8), (256, 16, 4), (256, 16, 2),
           (128, 16, 2), (128, 16, 4), (256, 64, 8), (128, 64, 4), (64, 64, 4)]


def time_launch(fn, device: torch.device) -> float | None:
    """Microseconds per call of fn, replayed from a CUDA graph as bench/kernels.py times the step
    kernel (None off CUDA)."""
    if device.type != "cuda":
        return None
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50)


def sweep(batches: list[int], NH: int, DK: int, DV: int, device: torch.device) -> list[dict]:
    chosen = step_module._tiles
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    try:
        for B in batches:
            q, v = rand(B, NH, DK).bfloat16(), rand(B, NH, DV).bfloat16()
            k = rand(B, NH, DK, scale=DK ** -0.5).bfloat16()
            i, f = rand(B, NH).bfloat16(), rand(B, NH, shift=3.0).bfloat16()
            slots = torch.arange(B, device=device, dtype=torch.int32)
            start = (rand(B, NH, DK, DV), rand(B, NH, DK), rand(B, NH, 1))
            now = chosen(B, NH, DK, DV)
            ref = None
            for cfg in [now] + [c for c in CONFIGS if c != now and c[0] <= DK and c[1] <= DV]:
                step_module._tiles = lambda *_, cfg=cfg: cfg
                C, n, m = (t.clone() for t in start)
                h = step_module.mlstm_step_slots_(q, k, v, i, f, C, n, m, slots)
                out = (h.float(), C.clone(), n.clone(), m.clone())
                ref = ref or out
                diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(out, ref))
                us = time_launch(lambda: step_module.mlstm_step_slots_(q, k, v, i, f, C, n, m, slots), device)
                rows.append({"batch": B, "bk": cfg[0], "bv": cfg[1], "num_warps": cfg[2], "chosen": cfg == now,
                             "us_per_launch": us, "max_rel_diff_vs_chosen": diff})
                print(f"batch {B:3d} tiles {cfg}{' (chosen)' if cfg == now else ''}: "
                      f"{'-' if us is None else f'{us:.2f} us'}, max rel diff {diff:.1e}", flush=True)
    finally:
        step_module._tiles = chosen
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--heads", type=int, nargs=3, default=[8, 256, 512], metavar=("NH", "DK", "DV"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = sweep(args.batches, *args.heads, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "heads": args.heads, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
