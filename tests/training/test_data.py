"""The packed loader: rows are the document stream cut in pieces, deterministic, resumable, sharded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fast_xlstm.training.corpus import ShardWriter, TokenCorpus
from fast_xlstm.training.data import IGNORE_INDEX, PackedLoader


@pytest.fixture
def corpus(tmp_path) -> TokenCorpus:
    """60 documents of 1..40 tokens: [0, d+1, d+1, ...] so every token names its document."""
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, vocab_size=1024, shard_tokens=200, with_mask=False)
    for d in range(60):
        w.add(np.array([0] + [d + 1] * int(rng.integers(0, 40)), np.int64))
    w.close()
    return TokenCorpus(tmp_path)


def test_rows_are_the_document_stream(corpus):
    loader = PackedLoader(corpus, seq_len=32, micro_batch_size=2, shuffle=False)
    stream = np.concatenate([corpus.document(d)[0] for d in range(corpus.num_documents)])
    for g in range(loader.rows_per_epoch):
        ids, labels, starts = loader.row(g)
        assert np.array_equal(ids, stream[g * 32:g * 32 + 32]) and np.array_equal(labels, stream[g * 32 + 1:g * 32 + 33])
        # Resets exactly at the row start and at each BOS (every document starts with id 0).
        assert starts[0] and np.array_equal(starts[1:], ids[1:] == 0)


def test_shuffled_epochs_cover_every_document_once(corpus):
    loader = PackedLoader(corpus, seq_len=16, micro_batch_size=1, seed=3)
    first = np.concatenate([loader.row(g)[0] for g in range(loader.rows_per_epoch)])
    second = np.concatenate([loader.row(g)[0] for g in range(loader.rows_per_epoch, 2 * loader.rows_per_epoch)])
    assert not np.array_equal(first, second)  # a new order each epoch
    docs_seen = [int(t) - 1 for t in first[1:][first[:-1] == 0] if t]  # token after each BOS
    assert len(set(docs_seen)) == len(docs_seen)


def test_resume_from_a_saved_position_gives_the_same_batches(corpus):
    a = PackedLoader(corpus, seq_len=16, micro_batch_size=2, seed=1)
    a.next_step(3)
    saved = a.state_dict()
    expect = [b.input_ids for _ in range(5) for b in a.next_step(2)]
    b = PackedLoader(corpus, seq_len=16, micro_batch_size=2, seed=1)
    b.load_state_dict(saved)
    got = [x.input_ids for _ in range(5) for x in b.next_step(2)]
    assert all(torch.equal(x, y) for x, y in zip(expect, got))
    with pytest.raises(ValueError, match="seq_len"):
        PackedLoader(corpus, seq_len=8, micro_batch_size=2, seed=1).load_state_dict(saved)


def test_ranks_get_disjoint_rows_that_make_up_the_global_batch(corpus):
    one = PackedLoader(corpus, seq_len=16, micro_batch_size=4)
    ranks = [PackedLoader(corpus, seq_len=16, micro_batch_size=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        want = {g for b in one.next_step(1) for g in b.rows}
        per_rank = [{g for b in loader.next_step(2) for g in b.rows} for loader in ranks]
        assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == want
    assert one.next_row == ranks[0].next_row == ranks[1].next_row


def test_loss_mask_hides_prompt_targets(tmp_path):
    w = ShardWriter(tmp_path, vocab_size=1024, shard_tokens=10**6, with_mask=True)
    for _ in range(4):
        w.add(np.array([0, 5, 6, 7, 8, 9]), np.array([0, 0, 0, 1, 1, 1]))
    w.close()
    ids, labels, _ = PackedLoader(TokenCorpus(tmp_path), seq_len=12, micro_batch_size=1, shuffle=False).row(0)
    # Targets 7, 8, 9 are trained; the prompt (5, 6) and the next document's BOS are not.
    assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX] * 2
