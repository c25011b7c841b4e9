"""Where the bf16 backward's error sits at long contexts: per-gradient max/max error and per-position error
quantiles against the float64 torch oracle, ours and mlstm_kernels' limit_chunk on the same inputs.

At the 7B head shapes (NH 8, DK 256, DV 512), one sequence, bf16 q/k/v, the gates of tests/ops/triton/
test_gpu.py; loss = sum(h * w) with fixed random w. A max/max error is set by the worst-conditioned rows
(a normalizer |n.q| that nearly cancels makes h and its gradients large there); the quantiles show the rest.

    python bench/bwd_error_profile.py [--contexts 16384 65536] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from fast_xlstm.ops import mlstm_chunkwise_torch
from fast_xlstm.ops.triton import mlstm_chunkwise_triton

NH, DK, DV = 8, 256, 512


def _inputs(S: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, device="cuda")
    q, k, v = rn(1, NH, S, DK).bfloat16(), rn(1, NH, S, DK).bfloat16(), rn(1, NH, S, DV).bfloat16()
    i = 15 * torch.tanh(3 * rn(1, NH, S) / 15)
    f = 15 * torch.tanh((3 + 2 * rn(1, NH, S)) / 15)
    return [q, k, v, i, f]


def _grads(fn, x, w):
    xs = [t.detach().clone().requires_grad_() for t in x]
    h = fn(*xs)
    (h.double() * w).sum().backward()
    return [t.grad.double() for t in xs]


def _stats(g: torch.Tensor, ref: torch.Tensor) -> dict:
    d = g - ref
    out = {"max_rel": (d.abs().max() / ref.abs().max()).item()}
    if g.dim() == 4:
        row = (d.norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-30)).flatten()
        q = row.quantile(row.new_tensor([0.5, 0.99, 0.999]))
        out.update(row_median=q[0].item(), row_p99=q[1].item(), row_p999=q[2].item(), row_max=row.max().item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="*", default=[16384, 65536])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    impls = {"ours": lambda q, k, v, i, f: mlstm_chunkwise_triton(q, k, v, i, f)[0]}
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
        mk = get_mlstm_kernel("chunkwise--triton_limit_chunk")
        impls["mlstm_kernels_limit_chunk"] = lambda q, k, v, i, f: mk(
            q, k, v, i, f, chunk_size=64, autocast_kernel_dtype=torch.bfloat16, return_last_states=False)
    except Exception as e:  # the comparison is optional
        print(f"mlstm_kernels unavailable: {e!r}")
    rows = []
    for S in args.contexts:
        x = _inputs(S, seed=S + 5)
        g = torch.Generator(device="cuda").manual_seed(7)
        w = torch.randn(1, NH, S, DV, generator=g, device="cuda", dtype=torch.float64)
        ref = _grads(lambda *t: mlstm_chunkwise_torch(*(u.double() for u in t), chunk_size=256)[0], x, w)
        row = {"context": S}
        for name, fn in impls.items():
            try:
                gs = _grads(fn, x, w)
                row[name] = {n: _stats(a, b) for n, a, b in zip("qkvif", gs, ref)}
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        del x, w, ref
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
