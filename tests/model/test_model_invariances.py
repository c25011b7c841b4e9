"""Model-level invariances: prefill + decode = one forward; chunked prefill; packed = one by one; fused = single."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm.config import xlstm_tiny
from fast_xlstm.state import concat_states, init_state, select_state

from modelutil import random_ids, rel_err, tiny_model

TOL = 1e-5  # fp32, relative to the largest logit


@torch.no_grad()
def test_prefill_then_step_decode_equals_full_forward(model):
    ids = random_ids((3, 41), seed=1)
    full, full_state = model(ids)
    logits, state = model(ids[:, :17])
    steps = []
    for t in range(17, 41):
        step_logits, state = model.step(ids[:, t], state)
        steps.append(step_logits)
    assert rel_err(logits, full[:, :17]) < TOL
    assert rel_err(torch.stack(steps, 1), full[:, 17:]) < TOL
    for a, b in zip(state, full_state):
        for x, y in zip(a, b):
            assert rel_err(x, y) < TOL


@torch.no_grad()
def test_chunked_prefill_with_state_handoff_equals_one_call(model):
    ids = random_ids((2, 150), seed=2)
    full, full_state = model(ids)
    state, parts = None, []
    for a, b in ((0, 1), (1, 64), (64, 65), (65, 150)):
        logits, state = model(ids[:, a:b], state)
        parts.append(logits)
    assert rel_err(torch.cat(parts, 1), full) < TOL
    assert rel_err(state[-1][0], full_state[-1][0]) < TOL


@torch.no_grad()
def test_input_state_is_not_modified(model):
    ids = random_ids((2, 9), seed=3)
    _, state = model(ids)
    snapshot = [tuple(t.clone() for t in layer) for layer in state]
    model(ids, state)
    model.step(ids[:, 0], state)
    for a, b in zip(state, snapshot):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


@torch.no_grad()
def test_packed_ragged_batch_equals_one_by_one(model):
    lengths = [5, 1, 70, 33]
    seqs = [random_ids((1, n), seed=10 + j) for j, n in enumerate(lengths)]
    # Each sequence continues from its own (different) earlier state.
    starts = [model(random_ids((1, 3 + j), seed=20 + j))[1] for j in range(len(seqs))]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed = torch.cat(seqs, 1)
    logits, state = model(packed, concat_states(starts), cu_seqlens=cu)
    last, _ = model(packed, concat_states(starts), cu_seqlens=cu, last_logits_only=True)
    for j, (seq, start) in enumerate(zip(seqs, starts)):
        ref_logits, ref_state = model(seq, start)
        assert rel_err(logits[:, cu[j]:cu[j + 1]], ref_logits) < TOL
        assert rel_err(last[j], ref_logits[0, -1]) < TOL
        for a, b in zip(select_state(state, [j]), ref_state):
            for x, y in zip(a, b):
                assert rel_err(x, y) < TOL


@torch.no_grad()
def test_fused_projections_equal_single_for_many_blocks():
    cfg = xlstm_tiny().replace(num_blocks=12)
    single = tiny_model(cfg, seed=5)
    fused = tiny_model(cfg, seed=5).fuse_projections()
    ids = random_ids((2, 30), seed=4)
    a, sa = single(ids)
    b, sb = fused(ids)
    assert rel_err(b, a) < TOL
    assert rel_err(fused.step(ids[:, 0], sb)[0], single.step(ids[:, 0], sa)[0]) < TOL
    assert all(hasattr(blk.mlstm_layer, "qkv_opreact") for blk in fused.backbone.blocks)


@torch.no_grad()
def test_bf16_model_keeps_gates_in_fp32_and_tracks_fp32(model):
    ids = random_ids((2, 40), seed=6)
    ref, _ = model(ids)
    bf = tiny_model(seed=1234).cast(torch.bfloat16)
    layer = bf.backbone.blocks[0].mlstm_layer
    assert layer.q.weight.dtype == torch.bfloat16
    assert layer.igate_preact.weight.dtype == torch.float32
    out, state = bf(ids)
    assert out.dtype == torch.float32 and state[0][0].dtype == torch.float32
    assert rel_err(out, ref) < 0.05  # bf16 weights and activations, fp32 state


@torch.no_grad()
def test_explicit_zero_state_equals_none(model):
    ids = random_ids((2, 12), seed=7)
    a, _ = model(ids)
    b, _ = model(ids, init_state(model.config, 2))
    assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, dtype=torch.long), "shape \\[B, S\\]"),
    (torch.full((1, 3), 1024), "must lie in \\[0, 1024\\)"),
    (torch.full((1, 3), -1), "must lie in"),
    (torch.ones(1, 3), "integer token ids"),
])
def test_bad_input_ids_raise(model, bad, match):
    with pytest.raises(ValueError, match=match):
        model(bad)


def test_state_of_wrong_length_raises(model):
    ids = random_ids((1, 4))
    _, state = model(ids)
    with pytest.raises(ValueError, match="per-block states"):
        model(ids, state[:1])
