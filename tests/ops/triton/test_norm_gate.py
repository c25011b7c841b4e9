"""The one-pass output norm and gate against the model's own torch code (same rounding points)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm import ops
from fast_xlstm.model.layers import MultiHeadLayerNorm
from fast_xlstm.ops.triton import head_norm_gate_triton


def _inputs(lead, NH, DH, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, NH, DH, generator=g) * 3 + 0.5).to(dtype)  # a mean to remove, a scale to undo
    o = torch.randn(*lead, NH * DH, generator=g).to(dtype)
    w = (1 + 0.3 * torch.randn(NH * DH, generator=g)).to(dtype)
    return h.to(device), o.to(device), w.to(device)


def _torch_form(h, o, w, eps):
    norm = MultiHeadLayerNorm(h.shape[-2], h.shape[-1], eps=eps).to(h.device)
    with torch.no_grad():
        norm.weight.data = w.clone()
        return torch.sigmoid(o) * norm(h)


def _check(y, ref):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert not y.isnan().any()
    # Rounded at the same points as the module; only rsqrt/sigmoid approximations differ: within one
    # 16-bit rounding step of the result, and equal almost everywhere.
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert (y == ref).float().mean().item() > 0.9


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lead,NH,DH", [((1, 37), 2, 32), ((3, 5), 4, 24), ((21,), 1, 64), ((1,), 8, 64)])
def test_matches_the_module(lead, NH, DH, dtype, device, seed):
    """Row counts that leave partial tiles, a head width that is not a power of two, several heads, and
    the one row of a batch-1 decode step (its own launch config)."""
    h, o, w = _inputs(lead, NH, DH, dtype, device, seed)
    _check(head_norm_gate_triton(h, o, w, 1e-6), _torch_form(h, o, w, 1e-6))


def test_reads_projection_views_in_place(device, seed):
    """h as the token-major transpose of the cell output, o as a column slice of the fused projection."""
    NH, DH, S = 2, 32, 29
    h, _, w = _inputs((1, S), NH, DH, torch.bfloat16, device, seed)
    h_cell = h.transpose(1, 2).contiguous().transpose(1, 2)  # [1, S, NH, DH] view of [1, NH, S, DH]
    proj = torch.randn(1, S, 3 * NH * DH, generator=torch.Generator().manual_seed(seed)).to(h)
    o = proj[..., NH * DH:2 * NH * DH]
    assert not o.is_contiguous() and not h_cell.is_contiguous()
    _check(head_norm_gate_triton(h_cell, o, w, 1e-5), _torch_form(h, o.contiguous(), w, 1e-5))
    assert head_norm_gate_triton(h[:, :0], o[:, :0], w, 1e-5).shape == (1, 0, NH * DH)


def test_rejects_bad_shapes_and_dtypes(device):
    h, o, w = _inputs((4,), 2, 16, torch.bfloat16, device, 0)
    with pytest.raises(ValueError, match="do not fit h"):
        head_norm_gate_triton(h, o[..., :16], w, 1e-6)
    with pytest.raises(ValueError, match="one 16-bit dtype"):
        head_norm_gate_triton(h.float(), o.float(), w.float(), 1e-6)


def test_dispatch_is_for_16_bit_inference_only(device):
    h, o, w = _inputs((1, 8), 2, 16, torch.bfloat16, device, 0)
    assert ops.head_norm_gate_supported(h, o, w)
    assert not ops.head_norm_gate_supported(h.float(), o.float(), w.float())
    assert not ops.head_norm_gate_supported(h, o, w.clone().requires_grad_(True))
    with torch.no_grad():
        assert ops.head_norm_gate_supported(h, o, w.clone().requires_grad_(True))
