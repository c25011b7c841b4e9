"""The runner's warm-up: every graph-prefill bucket built (captured on CUDA), the state pool left
empty, and prefills after it equal those of a runner that never warmed up."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fast_xlstm.engine.runner import PREFILL_GRAPH_SEQS, DecodeMode, ModelRunner
from fast_xlstm.generation.params import SamplingParams

from modelutil import random_ids, tiny_model


def test_warm_up_builds_every_prefill_bucket_and_leaves_no_trace(device):
    model = tiny_model(seed=5).to(device)
    warm, cold = (ModelRunner(model, num_slots=5, max_graph_prefill_tokens=32) for _ in range(2))
    greedy = DecodeMode(sample=False, filters=False, penalties=False, logprobs=False)
    warm.warm_up([greedy])
    seqs = [n for n in PREFILL_GRAPH_SEQS if n <= 5]
    assert {(lay.max_seqs, lay.num_tokens) for _, lay in warm._planned} == {(n, t) for n in seqs for t in (16, 32)}
    if warm.use_cuda_graph:
        assert all(e.graph is not None for e in warm._planned.values())
        assert {b for b, _ in warm._graphs} == set(warm.buckets)
    assert all(not t.any() for layer in warm.pool.layers for t in layer), "warm-up must leave the pool empty"
    slots, lengths = [3, 0, 4], [9, 2, 17]
    pieces = [random_ids((n,), model.config.vocab_size, seed=40 + n).tolist() for n in lengths]
    params = [SamplingParams(temperature=0)] * 3
    for runner in (warm, cold):
        for s in slots:
            runner.start_request(s, [], params[0], seed=0)
    a = warm.prefill(slots, pieces, [True] * 3, params)
    b = cold.prefill(slots, pieces, [True] * 3, params)
    assert a.tokens == b.tokens and not torch.isnan(a.logits).any()
    assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    for la, lb in zip(warm.pool.layers, cold.pool.layers):
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(la, lb))


def test_warm_up_builds_mixed_step_layouts_for_every_decode_bucket(device, monkeypatch):
    import fast_xlstm.engine.runner as runner_mod

    monkeypatch.setattr(runner_mod, "MIXED_WARM_UP_PROMPT", 16)  # (512 on a server: slow in the interpreter)
    model = tiny_model(seed=6).to(device)
    runner = ModelRunner(model, num_slots=3, max_graph_prefill_tokens=32)
    greedy = DecodeMode(sample=False, filters=False, penalties=False, logprobs=False)
    runner.warm_up([greedy], mixed=True)
    mixed = {(b, lay.max_seqs, lay.num_tokens) for b, lay in runner._planned if b}
    assert mixed == {(b, n, 16 * n) for b in runner.buckets for n in (1, 2)}  # 4 x 16 exceeds 32 tokens
    if runner.use_cuda_graph:
        assert all(e.graph is not None for e in runner._planned.values())
    assert all(not t.any() for layer in runner.pool.layers for t in layer), "warm-up must leave the pool empty"
