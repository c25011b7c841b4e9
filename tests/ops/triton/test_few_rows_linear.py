"""The few-row (2-64) tensor-core matrix kernel against the float64 product, its residual and SwiGLU
epilogues, and its `ops.linear` / `ops.swiglu` dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.ops.triton import few_rows_linear as frl
from fast_xlstm.ops.triton import few_rows_linear_triton, few_rows_swiglu_triton


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


@pytest.mark.parametrize("tiling", [(16, 64, 4, 1), (64, 128, 4, 2)])
@pytest.mark.parametrize("m", [3, 17, 64])
def test_residual_add_rounds_like_the_eager_add(m, tiling, device, seed, monkeypatch):
    """y = round(round(x W^T + b) + r): exactly the plain kernel's rounded product (same tiling) plus
    the residual, rounded once more, as `residual + linear(x)` rounds 16-bit tensors; also with the
    residual a strided view ([B, 1, N] rows of a wider tensor)."""
    monkeypatch.setattr(frl, "few_rows_tiling", lambda N, K, bm: tiling)
    x, w, b = _inputs(m, 90, 200, torch.bfloat16, device, seed, bias=True)
    wide = torch.randn(m, 1, 180, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.bfloat16)
    r = wide[..., 45:135]  # row stride 180
    y = few_rows_linear_triton(x[:, None], w, b, r)
    expected = (few_rows_linear_triton(x[:, None], w, b).float() + r.float()).to(torch.bfloat16)
    assert y.shape == (m, 1, 90)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    ref = x.double().cpu() @ w.double().cpu().T + b.double().cpu() + r[:, 0].double().cpu()
    assert ((y[:, 0].double().cpu() - ref).abs().max() / ref.abs().max()).item() <= 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("tiling", [(16, 64, 4, 1), (64, 128, 4, 2)])
@pytest.mark.parametrize("m,inner,k", [(2, 37, 300), (17, 64, 200), (64, 40, 130)])
def test_swiglu_matches_fp64_and_the_eager_ops(m, inner, k, tiling, device, seed, monkeypatch):
    """SiLU(gate) * up of a [2I, K] weight (gate rows first) against fp64 to a few bf16 half-ulps; and
    within one rounding of the eager ops on the plain kernel's own rounded halves. Gate and up
    swapped, or a half's columns shifted, would be off by O(1)."""
    monkeypatch.setattr(frl, "few_rows_tiling", lambda N, K, bm: tiling)
    x, w, _ = _inputs(m, 2 * inner, k, torch.bfloat16, device, seed)
    y = few_rows_swiglu_triton(x, w)
    assert y.shape == (m, inner) and y.dtype == torch.bfloat16
    both = x.double().cpu() @ w.double().cpu().T
    ref = torch.nn.functional.silu(both[:, :inner]) * both[:, inner:]
    err = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err <= 4 * TOL[torch.bfloat16], f"relative error {err:.2e}"
    halves = few_rows_linear_triton(x, w)
    eager = (torch.nn.functional.silu(halves[:, :inner]) * halves[:, inner:]).double().cpu()
    assert ((y.double().cpu() - eager).abs().max() / eager.abs().max()).item() <= TOL[torch.bfloat16]


def test_epilogues_reject_bad_input(device):
    x, w, b = _inputs(4, 16, 32, torch.bfloat16, device, 0, bias=True)
    with pytest.raises(ValueError, match="residual .* does not fit the output"):
        few_rows_linear_triton(x, w, b, torch.zeros(4, 8, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="residual .* does not fit the output"):
        few_rows_linear_triton(x, w, b, torch.zeros(4, 16, device=device))  # fp32 residual, bf16 output
    with pytest.raises(ValueError, match="even count"):
        few_rows_swiglu_triton(x, w[:15])
    with pytest.raises(ValueError, match="at most 64 rows"):
        few_rows_swiglu_triton(torch.cat([x] * 17), w)
    with pytest.raises(ValueError, match="does not fit x"):
        few_rows_swiglu_triton(x.float(), w.float())


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


def test_swiglu_and_residual_dispatch_by_row_count(device, seed):
    """2 to 64 bf16 rows: `ops.swiglu` and `ops.linear(.., residual)` take the few-row kernels (no
    separate SiLU, product or add) and match the torch forms to bf16 rounding; a residual that only
    broadcasts to the output is added after the kernel, exactly."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.nn.Linear(96, 2 * 40, bias=False).to(device, torch.bfloat16)
    down = torch.nn.Linear(40, 96, bias=False).to(device, torch.bfloat16)
    with torch.no_grad():
        for m in (2, 64):
            z = torch.randn(m, 1, 96, generator=gen).to(device, torch.bfloat16)
            r = torch.randn(m, 1, 96, generator=gen).to(device, torch.bfloat16)
            assert _ran(lambda: ops.swiglu(z, up), "few_rows_swiglu")
            assert not _ran(lambda: ops.swiglu(z, up), "aten::silu")
            assert not _ran(lambda: ops.linear(ops.swiglu(z, up), down, r), "aten::add")
            y = ops.linear(ops.swiglu(z, up), down, r)
            g, u = up(z).split(40, dim=-1)
            ref = (r + down(torch.nn.functional.silu(g) * u)).double().cpu()
            assert y.shape == ref.shape
            assert ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item() <= 4 * TOL[torch.bfloat16]
        act = ops.swiglu(z, up)
        r_row = torch.randn(96, generator=gen).to(device, torch.bfloat16)  # broadcasts over the rows
        assert _ran(lambda: ops.linear(act, down, r_row), "aten::add")
        torch.testing.assert_close(ops.linear(act, down, r_row), r_row + ops.linear(act, down), rtol=0, atol=0)
