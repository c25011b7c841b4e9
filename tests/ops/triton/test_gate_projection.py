"""The fp32 gate projection kernel against the float64 product of the same (upcast) inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.ops.triton import gate_projection as gp
from fast_xlstm.ops.triton import gate_projection_triton

# fp32 accumulation over K <= 4096 of products of bf16-exact and fp32 values; observed ~1e-7 relative.
TOL = 1e-5


def _inputs(shape, n, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(n, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(n, generator=g)
    return x.to(device), w.to(device), b.to(device)


def _oracle(x, w, b):
    return (x.double().cpu() @ w.double().cpu().T + b.double().cpu())


@pytest.mark.parametrize("rows_per_program,splits", [(16, 1), (64, 4), (64, 3)])
@pytest.mark.parametrize("shape,n", [((3, 37, 200), 6), ((1, 70, 256), 16), ((5, 128), 40)])
def test_matches_fp64_product(shape, n, rows_per_program, splits, device, seed, monkeypatch):
    """Odd row counts and widths (masked tails), output widths below, at and above 16, two row tilings,
    input features split over programs (a split past K's end adds nothing; the bias enters once).
    The tolerance is fp32's: a kernel that rounded the fp32 weights to bf16 would miss it by ~100x."""
    monkeypatch.setattr(gp, "_ROWS_PER_PROGRAM", rows_per_program)
    monkeypatch.setattr(gp, "_K_SPLITS", splits)
    x, w, b = _inputs(shape, n, torch.bfloat16, device, seed)
    y = gate_projection_triton(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], n)
    ref = _oracle(x, w, b)
    err = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL, f"relative error {err:.2e}"


def test_strided_rows_and_empty_input(device, seed):
    x, w, b = _inputs((2, 9, 96), 8, torch.bfloat16, device, seed)
    wide = torch.cat([x, x], -1)[..., :96]  # rows with a stride of 192 elements
    assert not wide.is_contiguous()
    torch.testing.assert_close(gate_projection_triton(wide, w, b), gate_projection_triton(x.contiguous(), w, b))
    assert gate_projection_triton(x[:, :0], w, b).shape == (2, 0, 8)


def test_rejects_mismatched_weight_and_non_bf16_input(device):
    x, w, b = _inputs((4, 32), 8, torch.bfloat16, device, 0)
    with pytest.raises(ValueError, match="do not fit input features 32"):
        gate_projection_triton(x, w[:, :16], b)
    with pytest.raises(ValueError, match="takes bf16 input"):
        gate_projection_triton(x.float(), w, b)


def test_dispatch_uses_the_kernel_for_inference_and_the_linear_for_gradients(device, seed):
    x, w, b = _inputs((3, 50, 64), 8, torch.bfloat16, device, seed)
    ref = torch.nn.functional.linear(x.float(), w, b)
    torch.testing.assert_close(ops.gate_projection(x, w, b), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.gate_projection(x.float(), w, b), ref)  # fp32 input: the linear itself
    w.requires_grad_(True)
    y = ops.gate_projection(x, w, b)  # the custom op has no backward: the linear must carry the gradient
    y.sum().backward()
    torch.testing.assert_close(w.grad, x.float().reshape(-1, 64).sum(0).expand(8, 64).contiguous(),
                               rtol=1e-4, atol=1e-3)
