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


def _rms_norm(d, dtype, device, seed):
    from fast_xlstm.model.layers import RMSNorm

    norm = RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(seed)))
    return norm.to(device, dtype)


# Fused forms: the activation rounds where torch's does, so the kernel's input matches the torch one up
# to an occasional last-bit flip (the fp32 statistics sum in another order); the product then rounds
# (half an ulp), and the residual add rounds again: 2^-7 of the largest output for bf16.
FUSED_TOL = 2 ** -7 + 1e-5


@pytest.mark.parametrize("form", ["norm", "swiglu", "norm+residual", "swiglu+residual", "residual"])
@pytest.mark.parametrize("n,k", [(130, 300), (40, 1000)])
def test_fused_forms_match_their_torch_composition(form, n, k, device, seed, monkeypatch):
    """RMSNorm before, silu(gate) * up before, a residual add after: the kernel against the same steps
    as torch ops in bf16, then the fp64 product. Small tiles, so the norm's statistics loop and the
    masked tails span several tiles."""
    monkeypatch.setattr(rl, "row_linear_tiling", lambda N, K: (16, 128, 4))
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    width = 2 * k if "swiglu" in form else k
    x = (3 * torch.randn(1, width, generator=g)).to(device, dt)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dt)
    r = torch.randn(1, n, generator=g).to(device, dt) if "residual" in form else None
    norm = _rms_norm(k, dt, device, seed) if "norm" in form else None
    with torch.no_grad():
        y = row_linear_triton(x, w, None, None if norm is None else norm.weight, 1e-6, r, "swiglu" in form)
        act = x
        if norm is not None:
            act = norm(x)
        if "swiglu" in form:
            gate, up = x.chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
        ref = (act.double().cpu() @ w.double().cpu().T).to(dt)
        if r is not None:
            ref = ref + r.cpu()
    assert y.shape == (1, n) and y.dtype == dt and torch.isfinite(y).all()
    err = _rel_err(y, ref.double())
    assert err <= FUSED_TOL, f"{form}: relative error {err:.2e}"


def test_fused_forms_reject_what_does_not_fit(device):
    x, w, _ = _inputs(16, 32, torch.bfloat16, device, 0)
    nw = torch.ones(32, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"gate \| up halves"):
        row_linear_triton(x, w, swiglu=True)
    with pytest.raises(ValueError, match="one input activation at a time"):
        row_linear_triton(torch.cat([x, x], -1), w, norm_weight=nw, swiglu=True)
    with pytest.raises(ValueError, match="norm weight"):
        row_linear_triton(x, w, norm_weight=nw[:8])
    with pytest.raises(ValueError, match="residual .* is not the output's"):
        row_linear_triton(x, w, residual=torch.ones(1, 8, device=device, dtype=torch.bfloat16))


def test_linear_fused_forms_equal_the_torch_path(device, seed):
    """`ops.linear` with norm / swiglu / residual: one row through the kernel close to the torch path
    (the same call with two equal rows, which runs torch ops), and those two rows identical."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    d, inner = 96, 160
    up = torch.nn.Linear(d, 2 * inner, bias=False).to(device, dt)
    down = torch.nn.Linear(inner, d, bias=False).to(device, dt)
    norm = _rms_norm(d, dt, device, seed)
    x = torch.randn(1, 1, d, generator=g).to(device, dt)
    with torch.no_grad():
        def block(x):
            return ops.linear(ops.linear(x, up, norm=norm), down, swiglu=True, residual=x)
        assert _ran_row_linear(lambda: block(x))
        one = block(x)
        two = block(torch.cat([x, x]))
    assert one.shape == (1, 1, d)
    torch.testing.assert_close(two[0], two[1], rtol=0, atol=0)
    assert _rel_err(one[0], two[0].double().cpu()) <= 2 * FUSED_TOL


def test_one_row_block_step_equals_the_batched_step(device, seed):
    """A bf16 block's decode step at batch 1 (norms, residual adds and SwiGLU inside the kernels)
    against the same row stepped in a batch of two (torch projections), from equal pool rows: the
    outputs and the updated states agree to bf16 rounding (a few ulps through the block's two
    residual branches), with no NaN."""
    from fast_xlstm.config import get_preset
    from fast_xlstm.model import XLSTMForCausalLM
    from fast_xlstm.state import StatePool

    torch.manual_seed(seed)
    model = XLSTMForCausalLM.from_config(get_preset("xlstm-tiny"), dtype=torch.bfloat16).fuse_projections()
    model.to(device)
    block = model.backbone.blocks[0]
    pool = StatePool(model.config, 4, device=device)
    g = torch.Generator().manual_seed(seed)
    layer = pool.layers[0]
    for t in layer:
        t.copy_(torch.randn(t.shape, generator=g).abs() if t is layer[2] else torch.randn(t.shape, generator=g))
        t[1].copy_(t[0])  # rows 0 and 1 equal
    x = torch.randn(1, model.config.embedding_dim, generator=g).to(device, torch.bfloat16)
    slot0 = torch.tensor([0], dtype=torch.int32, device=device)
    with torch.no_grad():
        snapshot = [t.clone() for t in layer]
        assert _ran_row_linear(lambda: block.step_slots(x, layer, slot0))
        for t, s in zip(layer, snapshot):
            t.copy_(s)  # the check above stepped row 0: put it back
        one = block.step_slots(x, layer, slot0)
        two = block.step_slots(torch.cat([x, x]), layer, torch.tensor([1, 2], dtype=torch.int32, device=device))
    assert torch.isfinite(one).all() and one.shape == x.shape
    assert _rel_err(one, two[:1].double().cpu()) <= 4 * FUSED_TOL
    for t in layer:
        assert ((t[0].double() - t[1].double()).abs().max() / t[1].double().abs().max()).item() <= 1e-2
