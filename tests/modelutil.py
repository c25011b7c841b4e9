"""Helpers shared by tests: tiny random models, error measures, and running an engine to completion."""

from __future__ import annotations

import torch

from fast_xlstm.config import XLSTMConfig, xlstm_tiny
from fast_xlstm.model import XLSTMForCausalLM


def tiny_model(config: XLSTMConfig | None = None, seed: int = 0) -> XLSTMForCausalLM:
    return XLSTMForCausalLM.from_config(config or xlstm_tiny(), init="random", seed=seed)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|; fails on NaN or inf so a broken run can never pass."""
    assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite values"
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def random_ids(shape: tuple[int, ...], vocab: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def drain(engine) -> dict:
    """Steps `engine` (an `LLMEngine`) until nothing is left; {request id: its final RequestOutput}."""
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done
