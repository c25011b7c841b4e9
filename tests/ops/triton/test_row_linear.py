"""The one-row matrix-vector kernel against the float64 product, and the `ops.linear` dispatch to it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.ops.triton import row_linear as rl
from fast_xlstm.ops.triton import row_linear_triton


def _inputs(n, k, dtype, device, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x.to(device), w.to(device), None if b is None else b.to(device)


def _oracle(x, w, b):
    y = x.double().cpu() @ w.double().cpu().T
    return y if b is None else y + b.double().cpu()


def _rel_err(y, ref):
    return ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# The kernel sums in fp32 and rounds once to the 16-bit output: the error is that rounding, at most half
# an ulp of an output, which relative to the largest output is at most 2^-8 (bf16) or 2^-11 (fp16),
# plus fp32 summation noise (~1e-6). A kernel that dropped a K tile or a row block would be off by O(1).
TOL = {torch.bfloat16: 2 ** -8 + 1e-5, torch.float16: 2 ** -11 + 1e-5}


@pytest.mark.parametrize("tiling", [(2, 64, 4), (16, 128, 4), (64, 256, 8)])
@pytest.mark.parametrize("n,k", [(130, 300), (64, 512), (7, 1000)])
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.float16, True)])
def test_matches_fp64_product(n, k, tiling, dtype, bias, device, seed, monkeypatch):
    """Row counts that are not a multiple of the rows per program and widths that are not a multiple of
    the tile (masked tails on both sides), tiles wider than K, with and without a bias."""
    monkeypatch.setattr(rl, "row_linear_tiling", lambda N, K: tiling)
    x, w, b = _inputs(n, k, dtype, device, seed, bias)
    y = row_linear_triton(x, w, b)
    assert y.dtype == dtype and y.shape == (1, n)
    err = _rel_err(y, _oracle(x, w, b))
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_any_leading_shape_of_one_row(device, seed):
    x, w, _ = _inputs(48, 96, torch.bfloat16, device, seed)
    y = row_linear_triton(x.reshape(1, 1, 96), w)
    assert y.shape == (1, 1, 48)
    torch.testing.assert_close(y.reshape(1, 48), row_linear_triton(x, w), rtol=0, atol=0)


def test_rejects_more_rows_and_mismatched_weights(device):
    x, w, b = _inputs(16, 32, torch.bfloat16, device, 0, bias=True)
    with pytest.raises(ValueError, match="takes one row"):
        row_linear_triton(torch.cat([x, x]), w)
    with pytest.raises(ValueError, match="does not fit x"):
        row_linear_triton(x, w[:, :16])
    with pytest.raises(ValueError, match="does not fit x"):
        row_linear_triton(x, w.float())
    with pytest.raises(ValueError, match="bias .* does not fit 16 outputs"):
        row_linear_triton(x, w, b[:8])


def _ran_row_linear(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("row_linear" in e.name for e in prof.events())


def test_linear_takes_the_kernel_for_one_row_only(device, seed):
    """One row of bf16 input goes to the kernel (close to the module's result); several rows, fp32
    input or an input that needs a gradient call the module itself (exactly its result, grads flow)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(200, 72, bias=True).to(device, torch.bfloat16)
    x1 = torch.randn(1, 200, generator=g).to(device, torch.bfloat16)
    with torch.no_grad():
        assert _ran_row_linear(lambda: ops.linear(x1, lin))
        y1 = ops.linear(x1, lin)
        ref = _oracle(x1, lin.weight, lin.bias)
        assert _rel_err(y1, ref) <= TOL[torch.bfloat16]
        xs = torch.randn(3, 200, generator=g).to(device, torch.bfloat16)
        assert not _ran_row_linear(lambda: ops.linear(xs, lin))
        torch.testing.assert_close(ops.linear(xs, lin), lin(xs), rtol=0, atol=0)
        lin32 = torch.nn.Linear(200, 72).to(device)
        assert not _ran_row_linear(lambda: ops.linear(x1.float(), lin32))
    xg = x1.clone().requires_grad_(True)
    assert not _ran_row_linear(lambda: ops.linear(xg, lin))
    ops.linear(xg, lin).float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()
