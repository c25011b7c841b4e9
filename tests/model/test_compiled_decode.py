"""Compiled decode and short prefill: the fp32 gate projection (one fused reduction) and the block step
(no residual addmm)."""

from __future__ import annotations

import torch
from torch import nn

from fast_xlstm.model.mlstm import _linear_fp32


def run_and_get_code(fn, *args):
    """torch._inductor's helper, imported when a test runs: importing inductor imports Triton, and
    Triton must first be imported under TRITON_INTERPRET by tests/ops/triton (collected later)."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args)


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


def test_prefill_gate_projection_is_a_reduction_when_short_and_a_gemm_when_long():
    """[1, T, d] prefill input: short prefills (the latency path) fuse like decode; long ones keep
    the GEMM (each output row of the reduction re-reads x). Under dynamic shapes the row count is a
    guard, so one compiled function serves both sides, each exact to fp64."""
    from fast_xlstm.model.mlstm import GATE_REDUCTION_MAX_ROWS

    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    lin = _gate(64, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    short = torch.randn(1, 12, 64, generator=g)
    long = torch.randn(1, GATE_REDUCTION_MAX_ROWS + 44, 64, generator=g)
    for x, fused in ((short, True), (long, False)):
        torch._dynamo.reset()
        with torch.no_grad():
            _, code = run_and_get_code(torch.compile(lambda u: _linear_fp32(u, lin), fullgraph=True), x)
        src = "\n".join(code)
        has_gemm = "extern_kernels" in src and ("mm(" in src or "addmm(" in src)
        assert has_gemm != fused, f"T={x.shape[1]}: expected {'a fused reduction' if fused else 'the GEMM'}"
    torch._dynamo.reset()
    fn = torch.compile(lambda u: _linear_fp32(u, lin), fullgraph=True, dynamic=True)
    for x in (short, long, torch.randn(1, 40, 64, generator=g)):
        ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        with torch.no_grad():
            got = fn(x)
        assert got.dtype == torch.float32 and not torch.isnan(got).any()
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_compiled_block_decode_step_has_no_residual_addmm_and_equals_eager():
    """The residual adds stay plain adds (an addmm would copy the residual into the GEMM output
    first on CUDA), and the compiled step equals the eager step."""
    from fast_xlstm.config import get_preset
    from fast_xlstm.model import XLSTMForCausalLM
    from fast_xlstm.state import StatePool

    torch._dynamo.reset()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    model = XLSTMForCausalLM.from_config(get_preset("xlstm-tiny"), dtype=torch.float32).fuse_projections()
    block = model.backbone.blocks[0]
    x = torch.randn(4, model.config.embedding_dim)
    slots = torch.tensor([2, -1, 0, 3], dtype=torch.int32)
    pools = [StatePool(model.config, 4) for _ in range(2)]
    for p in pools:
        for t in p.stacked:
            t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(7)).abs() if t is p.stacked[2]
                    else torch.randn(t.shape, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        eager = block.step_slots(x, pools[0].layers[0], slots)
        compiled, code = run_and_get_code(torch.compile(block.step_slots, fullgraph=True), x, pools[1].layers[0], slots)
    assert "addmm" not in "\n".join(code)
    assert not torch.isnan(compiled).any()
    assert ((compiled - eager).abs().max() / eager.abs().max()).item() < 1e-5
    for a, b in zip(pools[0].stacked, pools[1].stacked):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
