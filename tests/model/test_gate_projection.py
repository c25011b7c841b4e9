"""The fp32 gate projection: eager GEMM and its compiled decode form (one fused reduction)."""

from __future__ import annotations

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from fast_xlstm.model.mlstm import _linear_fp32


def _gate(d: int, out: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, d, generator=g) / d ** 0.5)
        lin.bias.copy_(torch.randn(out, generator=g))
    return lin


def test_compiled_decode_gate_projection_is_one_reduction_and_exact_to_fp32():
    torch._dynamo.reset()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    lin = _gate(256, 16, seed)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    with torch.no_grad():
        eager = _linear_fp32(x, lin)
        compiled, code = run_and_get_code(torch.compile(lambda u: _linear_fp32(u, lin), fullgraph=True), x)
    assert compiled.dtype == torch.float32 and compiled.shape == (5, 16)
    for got in (eager, compiled):
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
    src = "\n".join(code)
    assert "extern_kernels.mm" not in src and "extern_kernels.addmm" not in src, "expected a fused reduction"


def test_prefill_shaped_gate_projection_keeps_the_gemm():
    torch._dynamo.reset()
    lin = _gate(64, 8, 0)
    x = torch.randn(1, 12, 64)  # [1, T, d]: prefill's shape; the product form would hold T x out x d
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(lambda u: _linear_fp32(u, lin), fullgraph=True), x)
    src = "\n".join(code)
    assert "extern_kernels" in src and ("mm(" in src or "addmm(" in src)
