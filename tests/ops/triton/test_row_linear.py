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


# ---- the fused forms: residual epilogue, SwiGLU, q/k/v/o with the fp32 gates -------------------------

def test_residual_add_rounds_like_the_eager_add(device, seed, monkeypatch):
    """y = round(round(W x) + r): exactly the rounded product (same kernel, same tiling) plus the
    residual, rounded once more, as `residual + linear(x)` does on 16-bit tensors; and near fp64."""
    monkeypatch.setattr(rl, "row_linear_tiling", lambda N, K: (16, 128, 4))
    x, w, b = _inputs(130, 300, torch.bfloat16, device, seed, bias=True)
    r = torch.randn(1, 130, generator=torch.Generator().manual_seed(seed + 1)).to(device, torch.bfloat16)
    y = row_linear_triton(x, w, b, r)
    expected = (row_linear_triton(x, w, b).float() + r.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    ref = _oracle(x, w, b) + r.double().cpu()
    assert _rel_err(y, ref) <= 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("tiling", [(2, 64, 4), (16, 128, 4)])
@pytest.mark.parametrize("inner,k", [(37, 300), (64, 512)])
def test_swiglu_matches_fp64(inner, k, tiling, device, seed, monkeypatch):
    """SiLU(gate) * up of a [2I, K] weight (gate rows first) against fp64: the gate, the up value, the
    SiLU and the product each round once to bf16, so the error is a few half-ulps of the largest
    output; gate and up swapped, or a half's rows shifted, would be off by O(1)."""
    monkeypatch.setattr(rl, "row_linear_tiling", lambda N, K: tiling)
    x, w, _ = _inputs(2 * inner, k, torch.bfloat16, device, seed)
    y = rl.row_swiglu_triton(x, w)
    assert y.shape == (1, inner) and y.dtype == torch.bfloat16
    both = _oracle(x, w, None)
    gate, up = both[:, :inner], both[:, inner:]
    ref = torch.nn.functional.silu(gate) * up
    err = _rel_err(y, ref)
    assert err <= 4 * TOL[torch.bfloat16], f"relative error {err:.2e}"
    # and within one bf16 rounding of the eager ops on the kernel's own rounded halves
    halves = row_linear_triton(x, w).float()
    eager = (torch.nn.functional.silu(halves[:, :inner].to(torch.bfloat16)) * halves[:, inner:].to(torch.bfloat16))
    assert _rel_err(y, eager.double().cpu()) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("cap", [15.0, None])
@pytest.mark.parametrize("n,g,k", [(130, 16, 300), (64, 5, 512)])
def test_linear_with_gates_matches_both_products(n, g, k, cap, device, seed, monkeypatch):
    """The 16-bit rows equal the plain kernel's exactly; the fp32 gate rows (x upcast exactly, bias,
    soft cap) match the fp64 product to fp32 summation noise."""
    monkeypatch.setattr(rl, "row_linear_tiling", lambda N, K: (16, 128, 4))
    x, w, b = _inputs(n, k, torch.bfloat16, device, seed, bias=True)
    gen = torch.Generator().manual_seed(seed + 2)
    wg = torch.randn(g, k, generator=gen).to(device) * 3 / k ** 0.5  # pre-activations of a few units: the cap bends
    bg = torch.randn(g, generator=gen).to(device)
    y, gates = rl.row_linear_gates_triton(x, w, b, wg, bg, cap)
    assert y.shape == (1, n) and gates.shape == (1, g) and gates.dtype == torch.float32
    torch.testing.assert_close(y, row_linear_triton(x, w, b), rtol=0, atol=0)
    pre = x.double().cpu() @ wg.double().cpu().T + bg.double().cpu()
    ref = pre if cap is None else cap * torch.tanh(pre / cap)
    assert (gates.double().cpu() - ref).abs().max().item() <= 1e-5 * (1 + ref.abs().max().item())
    if cap is not None:
        assert (pre - ref).abs().max() > 1e-2, "the inputs never reach the cap's bend: the test would not see it"


def test_fused_forms_reject_bad_input(device):
    x, w, b = _inputs(16, 32, torch.bfloat16, device, 0, bias=True)
    with pytest.raises(ValueError, match="residual .* does not fit 16 outputs"):
        row_linear_triton(x, w, b, torch.zeros(1, 8, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="residual .* does not fit 16 outputs"):
        row_linear_triton(x, w, b, torch.zeros(1, 16, device=device))  # fp32 residual for bf16 output
    with pytest.raises(ValueError, match="even count"):
        rl.row_swiglu_triton(x, w[:15])
    with pytest.raises(ValueError, match="takes one row"):
        rl.row_swiglu_triton(torch.cat([x, x]), w)
    wg, bg = torch.randn(4, 32, device=device), torch.randn(4, device=device)
    with pytest.raises(ValueError, match="does not fit x"):
        rl.row_linear_gates_triton(x, w, b, wg.to(torch.bfloat16), bg, 15.0)
    with pytest.raises(ValueError, match="gate bias .* does not fit 4 outputs"):
        rl.row_linear_gates_triton(x, w, b, wg, bg[:3], 15.0)
    with pytest.raises(ValueError, match="soft cap must be positive"):
        rl.row_linear_gates_triton(x, w, b, wg, bg, 0.0)


def _kernel_names(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_swiglu_and_residual_dispatch(device, seed):
    """One bf16 row: `ops.swiglu` and `ops.linear(.., residual)` take the kernels and match the torch
    forms to bf16 rounding; 2-64 rows take the few-row kernels (tests/ops/triton/test_few_rows_linear.py),
    more rows the torch forms exactly."""
    gen = torch.Generator().manual_seed(seed)
    up = torch.nn.Linear(96, 2 * 40, bias=False).to(device, torch.bfloat16)
    down = torch.nn.Linear(40, 96, bias=False).to(device, torch.bfloat16)
    z1 = torch.randn(1, 1, 96, generator=gen).to(device, torch.bfloat16)
    r1 = torch.randn(1, 1, 96, generator=gen).to(device, torch.bfloat16)
    with torch.no_grad():
        names = _kernel_names(lambda: ops.linear(ops.swiglu(z1, up), down, r1))
        assert any("row_swiglu" in n for n in names) and any("row_linear" in n for n in names)
        y1 = ops.linear(ops.swiglu(z1, up), down, r1)
        g, u = up(z1).split(40, dim=-1)
        ref = r1 + down(torch.nn.functional.silu(g) * u)
        assert y1.shape == ref.shape and _rel_err(y1, ref.double().cpu()) <= 4 * TOL[torch.bfloat16]
        zs = torch.randn(65, 1, 96, generator=gen).to(device, torch.bfloat16)
        rs = torch.randn(65, 1, 96, generator=gen).to(device, torch.bfloat16)
        names = _kernel_names(lambda: ops.linear(ops.swiglu(zs, up), down, rs))
        assert not any("row_" in n for n in names)
        g, u = up(zs).split(40, dim=-1)
        torch.testing.assert_close(ops.linear(ops.swiglu(zs, up), down, rs),
                                   rs + down(torch.nn.functional.silu(g) * u), rtol=0, atol=0)


def test_batch1_model_steps_take_the_fused_kernels(device, seed, monkeypatch, no_backend_env):
    """Decode steps of a fused bf16 model at batch 1 run the one-row kernels (q/k/v/o with the gates,
    SwiGLU, down projection with the residual, the output norm and gate) and stay as close to the fp32
    model as the torch path's bf16 steps (twice its error at most, plus bf16 rounding slack)."""
    from fast_xlstm.config import xlstm_tiny
    from fast_xlstm.model import XLSTMForCausalLM

    m32 = XLSTMForCausalLM.from_config(xlstm_tiny(), init="random", seed=seed, device=device).fuse_projections()
    m16 = XLSTMForCausalLM.from_config(xlstm_tiny(), init="random", seed=seed, device=device,
                                       dtype=torch.bfloat16).fuse_projections()
    ids = torch.randint(0, 1024, (5,), generator=torch.Generator().manual_seed(seed)).to(device)

    def run(model):
        state, out = None, []
        with torch.no_grad():
            for t in ids:
                logits, state = model.step(t[None], state)
                out.append(logits)
        return torch.cat(out)

    names = _kernel_names(lambda: run(m16))
    for op in ("row_linear_gates", "row_swiglu", "row_linear", "head_norm_gate"):
        assert any(op in n for n in names), f"the step ran no {op}"
    fused = run(m16)
    ref = run(m32).double().cpu()
    monkeypatch.setenv("FAST_XLSTM_BACKEND", "torch")
    plain = run(m16)
    err_fused, err_plain = _rel_err(fused, ref), _rel_err(plain, ref)
    assert err_fused <= 2 * err_plain + 2 ** -8, f"fused {err_fused:.2e} vs torch bf16 {err_plain:.2e}"
