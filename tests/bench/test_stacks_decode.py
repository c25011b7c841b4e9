"""The bench stacks' decode loops: each step's tokens reach the host (one step late) and the steps
compute what a step-by-step synchronous loop computes (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm.bench import stacks
from fast_xlstm.bench.stacks import OursStack
from fast_xlstm.config import get_preset
from fast_xlstm.model import XLSTMForCausalLM


def _model() -> XLSTMForCausalLM:
    return XLSTMForCausalLM.from_config(get_preset("xlstm-tiny"), dtype=torch.float32, device="cpu",
                                        seed=3).fuse_projections()


def test_ours_reads_every_step_and_matches_synchronous_steps(monkeypatch):
    batch, steps = 3, 5
    prompts = torch.randint(1, 200, (batch, 7), generator=torch.Generator().manual_seed(1))
    piped, synced = (OursStack(_model(), max_batch=4, state_dtype=torch.float32) for _ in range(2))
    assert piped.prefill(prompts) == synced.prefill(prompts)
    read = []
    collect = piped.runner.decode_collect

    def recording(pending):
        result = collect(pending)
        read.append(result.tokens)
        return result
    monkeypatch.setattr(piped.runner, "decode_collect", recording)
    piped.decode(batch, steps)
    expected = [synced.runner.decode(list(range(batch)), synced.mode).tokens for _ in range(steps)]
    assert read == expected  # every step's tokens, in order
    for a, b in zip(piped.runner.pool.stacked, synced.runner.pool.stacked):
        assert torch.equal(a, b)


def test_official_reads_every_step(monkeypatch):
    pytest.importorskip("xlstm")
    model = _model()
    prompts = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(2))
    official = stacks.OfficialStack(model, max_batch=2, state_dtype=torch.float32)
    official.prefill(prompts)
    read = []
    real = stacks._read_tokens
    monkeypatch.setattr(stacks, "_read_tokens", lambda *a: read.append(real(*a)) or read[-1])
    official.decode(2, 4)
    # The same steps by greedy decoding with our model (same weights): the official stack's tokens.
    ours = OursStack(model, max_batch=2, state_dtype=torch.float32)
    ours.prefill(prompts)
    expected = [ours.runner.decode([0, 1], ours.mode).tokens for _ in range(4)]
    assert read == expected
