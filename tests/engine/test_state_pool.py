"""The state-slot pool: per-block views of stacked tensors; reset, read and write touch only their slots."""

from __future__ import annotations

import torch

from fast_xlstm.config import xlstm_tiny
from fast_xlstm.state import StatePool, init_state, state_nbytes


def _random_state(config, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(t.shape, generator=g) for t in layer) for layer in init_state(config, n)]


def test_write_read_reset_touch_only_their_slots():
    config = xlstm_tiny()
    pool = StatePool(config, 5)
    assert len(pool.layers) == config.num_blocks and pool.nbytes == state_nbytes(init_state(config, 5))
    everyone = _random_state(config, 5, seed=1)
    pool.write([0, 1, 2, 3, 4], everyone)
    two = _random_state(config, 2, seed=2)
    pool.write([3, 1], two)
    got = pool.read([1, 3, 0])
    for b in range(config.num_blocks):
        for j in range(3):
            assert torch.equal(got[b][j][0], two[b][j][1]) and torch.equal(got[b][j][1], two[b][j][0])
            assert torch.equal(got[b][j][2], everyone[b][j][0])
    pool.reset([1])
    for b, layer in enumerate(pool.layers):
        for j, t in enumerate(layer):
            assert not t[1].any() and torch.equal(t[3], two[b][j][0]) and torch.equal(t[4], everyone[b][j][4])


def test_layers_are_live_views_and_reads_are_copies():
    config = xlstm_tiny()
    pool = StatePool(config, 3, dtype=torch.bfloat16)
    pool.layers[1][0][2].fill_(1.5)  # what an in-place kernel does to block 1's C of slot 2
    snap = pool.read([2])
    assert snap[1][0].dtype == torch.bfloat16 and bool((snap[1][0] == 1.5).all())
    pool.reset([2])
    assert bool((snap[1][0] == 1.5).all()) and not pool.layers[1][0][2].any()
    pool.write([0], _random_state(config, 1, seed=3))  # fp32 values cast into the bf16 pool
    assert pool.layers[0][0].dtype == torch.bfloat16 and pool.layers[0][0][0].abs().sum() > 0


def test_snapshots_write_back_whole_and_per_block_states_without_stacking():
    from fast_xlstm.state import StackedState

    config = xlstm_tiny()
    pool = StatePool(config, 4)
    pool.write([0, 1, 2, 3], _random_state(config, 4, seed=5))
    snap = pool.read([2, 0])
    assert isinstance(snap, StackedState) and snap.stacked[0].shape[:2] == (config.num_blocks, 2)
    assert all(snap[b][0].data_ptr() == snap.stacked[0][b].data_ptr() for b in range(config.num_blocks))
    pool.write([3, 1], snap)  # restore path: one copy per kind
    mixed = [tuple(t.clone() for t in layer) for layer in _random_state(config, 2, seed=6)]
    assert not isinstance(mixed, StackedState)
    pool.write([0, 2], mixed)  # a prefill's per-block states: copied block by block
    got = pool.read([3, 1, 0, 2])
    for b in range(config.num_blocks):
        for j in range(3):
            assert torch.equal(got[b][j][:2], snap[b][j]) and torch.equal(got[b][j][2:], mixed[b][j])
    reordered = [snap[1], snap[0]] + list(snap[2:])  # views of one tensor, but not in block order
    assert not isinstance(reordered, StackedState)
    pool.write([3, 1], reordered)  # copied block by block, in the order given
    got = pool.read([3, 1])
    assert torch.equal(got[0][0], snap[1][0]) and torch.equal(got[1][0], snap[0][0])
