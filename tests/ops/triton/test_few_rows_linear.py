"""The few-row (2-64) tensor-core matrix kernel against the float64 product, and its `ops.linear` dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.ops.triton import few_rows_linear as frl
from fast_xlstm.ops.triton import few_rows_linear_triton


def _inputs(m, n, k, dtype, device, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x.to(device), w.to(device), None if b is None else b.to(device)


def _rel_err(y, x, w, b):
    ref = x.double().cpu() @ w.double().cpu().T
    if b is not None:
        ref = ref + b.double().cpu()
    return ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()


# fp32 sums rounded once to the 16-bit output: at most half an ulp of an output, relative to the
# largest output 2^-8 (bf16) or 2^-11 (fp16), plus summation noise. A dropped tile, row or column is O(1).
TOL = {torch.bfloat16: 2 ** -8 + 1e-5, torch.float16: 2 ** -11 + 1e-5}


@pytest.mark.parametrize("tiling", [(16, 64, 4, 1), (64, 128, 4, 2)])
@pytest.mark.parametrize("m,n,k", [(2, 130, 300), (5, 64, 512), (16, 7, 1000), (11, 200, 96), (17, 90, 200),
                                   (64, 40, 130)])
@pytest.mark.parametrize("dtype,bias", [(torch.bfloat16, False), (torch.float16, True)])
def test_matches_fp64_product(m, n, k, tiling, dtype, bias, device, seed, monkeypatch):
    """Row counts up to 64 (both tile heights) that leave padded rows, columns and widths that leave
    masked tails, tiles wider than K, with and without a bias."""
    monkeypatch.setattr(frl, "few_rows_tiling", lambda N, K, bm: tiling)
    x, w, b = _inputs(m, n, k, dtype, device, seed, bias)
    y = few_rows_linear_triton(x, w, b)
    assert y.dtype == dtype and y.shape == (m, n)
    err = _rel_err(y, x, w, b)
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def test_reads_strided_rows_and_keeps_leading_dims(device, seed):
    """x as [B, 1, K] rows, and rows that are views into a wider tensor (a fused projection's split)."""
    x, w, _ = _inputs(6, 48, 160, torch.bfloat16, device, seed)
    y = few_rows_linear_triton(x[:, None], w)
    assert y.shape == (6, 1, 48)
    wide = torch.cat([x, torch.randn_like(x)], dim=-1)  # row stride 320
    torch.testing.assert_close(few_rows_linear_triton(wide[:, :160], w), y[:, 0], rtol=0, atol=0)


def test_rejects_bad_input(device):
    x, w, b = _inputs(4, 16, 32, torch.bfloat16, device, 0, bias=True)
    with pytest.raises(ValueError, match="at most 64 rows"):
        few_rows_linear_triton(torch.cat([x] * 17), w)
    with pytest.raises(ValueError, match="does not fit x"):
        few_rows_linear_triton(x, w[:, :16])
    with pytest.raises(ValueError, match="does not fit x"):
        few_rows_linear_triton(x.float(), w.float())
    with pytest.raises(ValueError, match="bias .* does not fit 16 outputs"):
        few_rows_linear_triton(x, w, b[:8])


def _ran(fn, name: str) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(name in e.name for e in prof.events())


def test_linear_dispatch_by_row_count(device, seed):
    """2 to 64 bf16 rows take the kernel (close to the fp64 product); 1 row the matrix-vector kernel;
    65 rows, fp32 input or input that needs a gradient the module itself (exactly its result)."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(200, 72, bias=True).to(device, torch.bfloat16)
    with torch.no_grad():
        for m in (2, 16, 17, 64):
            xm = torch.randn(m, 1, 200, generator=g).to(device, torch.bfloat16)
            assert _ran(lambda: ops.linear(xm, lin), "few_rows_linear")
            assert _rel_err(ops.linear(xm, lin)[:, 0], xm[:, 0], lin.weight, lin.bias) <= TOL[torch.bfloat16]
        x1 = torch.randn(1, 200, generator=g).to(device, torch.bfloat16)
        assert not _ran(lambda: ops.linear(x1, lin), "few_rows_linear")
        x65 = torch.randn(65, 200, generator=g).to(device, torch.bfloat16)
        assert not _ran(lambda: ops.linear(x65, lin), "few_rows_linear")
        torch.testing.assert_close(ops.linear(x65, lin), lin(x65), rtol=0, atol=0)
        lin32 = torch.nn.Linear(200, 72).to(device)
        assert not _ran(lambda: ops.linear(x65[:4].float(), lin32), "few_rows_linear")
    xg = torch.randn(4, 200, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    assert not _ran(lambda: ops.linear(xg, lin), "few_rows_linear")
    ops.linear(xg, lin).float().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()
