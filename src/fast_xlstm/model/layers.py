"""Building blocks of the xLSTM 7B block: norms, soft cap, SwiGLU feed-forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): bounds gate pre-activations (cap 15) and logits (cap 30); None = identity."""
    if cap is None:
        return x
    return cap * torch.tanh(x / cap)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a weight and no bias; the reduction runs in fp32.

    The normalized value is cast back to the input dtype before the weight multiply, as in the
    reference implementation, so bf16 runs round at the same place.
    """

    def __init__(self, dim: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__()
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        y = x.float() if self.force_float32 else x
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class MultiHeadLayerNorm(nn.Module):
    """Per-head LayerNorm (mean-centred, no bias) of the cell output, then one flat weight.

    Input [..., NH, DH] -> output [..., NH * DH].
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, force_float32: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.eps = eps
        self.force_float32 = force_float32
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() if self.force_float32 else x
        y = y - y.mean(-1, keepdim=True)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype).flatten(-2) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: proj_down(SiLU(proj_up_gate z) * proj_up z). `fuse()` merges the two up projections.
    The projections go through `ops.linear` / `ops.swiglu` (for one-row decode steps, matrix-vector
    kernels, and for 2-64 rows the few-row kernel, that also apply SiLU(gate) * up and the block's
    residual add)."""

    def __init__(self, dim: int, inner: int, bias: bool = False):
        super().__init__()
        self.inner = inner
        self.proj_up_gate = nn.Linear(dim, inner, bias=bias)
        self.proj_up = nn.Linear(dim, inner, bias=bias)
        self.proj_down = nn.Linear(inner, dim, bias=bias)
        self.fused = False

    @torch.no_grad()
    def fuse(self) -> None:
        """Replaces proj_up_gate/proj_up by one [2*inner, dim] projection (one GEMM instead of two)."""
        if self.fused:
            return
        a, b = self.proj_up_gate, self.proj_up
        fused = nn.Linear(a.in_features, 2 * self.inner, bias=a.bias is not None, device=a.weight.device,
                          dtype=a.weight.dtype)
        fused.weight.copy_(torch.cat([a.weight, b.weight], 0))
        if a.bias is not None:
            fused.bias.copy_(torch.cat([a.bias, b.bias], 0))
        self.proj_up_gate_z = fused
        del self.proj_up_gate, self.proj_up
        self.fused = True

    def forward(self, z: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """z [..., D] -> [..., D] (+ residual, added by the down projection's kernel for 1-64 rows)."""
        if self.fused:
            act = ops.swiglu(z, self.proj_up_gate_z)
        else:
            act = F.silu(ops.linear(z, self.proj_up_gate)) * ops.linear(z, self.proj_up)
        return ops.linear(act, self.proj_down, residual)
