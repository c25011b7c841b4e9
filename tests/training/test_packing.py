"""Packing never lets one document's state reach the next: checked on logits and on gradients."""

from __future__ import annotations

import torch

from fast_xlstm.training.data import IGNORE_INDEX
from fast_xlstm.training.packing import loss_sum, packed_logits, segment_offsets

from modelutil import random_ids, rel_err, tiny_model

S = 96
# Row 0: doc A [0, 40), doc B [40, 96). Row 1: the tail of a document, then doc C from 30.
STARTS = torch.zeros(2, S, dtype=torch.bool)
STARTS[0, [0, 40]] = True
STARTS[1, [0, 30]] = True


def test_segment_offsets_cut_rows_and_documents():
    assert segment_offsets(STARTS).tolist() == [0, 40, 96, 126, 192]
    no_flag = STARTS.clone()
    no_flag[1, 0] = False  # a row start is always a cut, flagged or not
    assert segment_offsets(no_flag).tolist() == [0, 40, 96, 126, 192]


def _doc_b_logits_and_grads(model, ids):
    """Logits of doc B (row 0, positions 40..95) and the gradients of a loss on doc B only."""
    model.zero_grad()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 40:95] = ids[0, 41:96]
    logits = packed_logits(model, ids, STARTS)
    loss_sum(logits, labels).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits[0, 40:].detach(), grads


def test_perturbing_one_document_changes_nothing_in_the_next():
    model = tiny_model(seed=11).train()  # every weight random: all paths of the block matter
    ids = random_ids((2, S), seed=1)
    ids[0, [0, 40]] = 0
    ids[1, 30] = 0
    logits, grads = _doc_b_logits_and_grads(model, ids)

    other = ids.clone()
    other[0, 1:40] = random_ids((1, 39), seed=2)  # doc A, everything but its BOS
    other[1] = random_ids((1, S), seed=3)  # the other row entirely
    logits2, grads2 = _doc_b_logits_and_grads(model, other)

    assert torch.equal(logits, logits2)
    assert grads.keys() == grads2.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:  # exactly: other positions contribute exact zeros
        assert torch.equal(grads[name], grads2[name]), name
    # Doc A's tokens do get gradients through doc A's own positions when they carry loss: the test
    # above is not vacuous because doc B's loss reaches every parameter.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "embeddings" not in n)


def test_a_packed_document_equals_the_document_alone():
    model = tiny_model(seed=12)
    ids = random_ids((2, S), seed=4)
    with torch.no_grad():
        packed = packed_logits(model, ids, STARTS)
        alone = model(ids[0:1, 40:])[0]  # doc B from the empty state
    assert rel_err(packed[0, 40:], alone[0]) < 1e-5


def test_without_the_cut_the_state_would_leak():
    # Guard against a test that cannot fail: the same perturbation does reach doc B when A and B
    # share one sequence.
    model = tiny_model(seed=11)
    ids = random_ids((1, S), seed=1)
    other = ids.clone()
    other[0, 1:40] = random_ids((1, 39), seed=2)
    with torch.no_grad():
        a, b = model(ids)[0][0, 40:], model(other)[0][0, 40:]
    assert (a - b).abs().max() > 1e-3


def test_packed_logits_hands_the_model_host_offsets():
    """The offsets reach the model in host memory whatever device the ids are on (each mLSTM layer reads
    them as ints: from device memory that read would wait for the GPU, several times per layer and step)."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, ids, cu_seqlens=None):
            seen["cu"] = cu_seqlens
            return torch.zeros(*ids.shape, 3), None

    ids = random_ids((2, S), seed=3).to("meta")  # any device but the host's (CI has no GPU)
    packed_logits(Spy(), ids, STARTS)
    # A list, not a tensor: FSDP's root moves tensor arguments to the GPU, a list it leaves alone.
    assert seen["cu"] == [0, 40, 96, 126, 192] and all(type(o) is int for o in seen["cu"])


def test_offsets_as_a_list_equal_offsets_as_a_tensor():
    model = tiny_model(seed=14)
    ids = random_ids((1, 2 * S), seed=6)
    cu = segment_offsets(STARTS)
    with torch.no_grad():
        a = model(ids, cu_seqlens=cu)[0]
        b = model(ids, cu_seqlens=cu.tolist())[0]
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_packed_loss_sum_equals_the_loss_of_the_packed_logits():
    """The model's fused head loss (forward(labels=...)) is the same math as logits then cross-entropy:
    loss and every gradient agree, with ignored targets in the labels."""
    from fast_xlstm.training.packing import packed_loss_sum

    ids = random_ids((2, S), seed=5)
    labels = torch.roll(ids, -1, dims=1)
    labels[1, :20] = IGNORE_INDEX  # e.g. prompt tokens of chat data
    results = []
    for fused in (False, True):
        model = tiny_model(seed=13).train()
        loss = (packed_loss_sum(model, ids, STARTS, labels) if fused
                else loss_sum(packed_logits(model, ids, STARTS), labels))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    assert torch.isfinite(got) and rel_err(got, want) < 1e-6
    assert want_grads.keys() == got_grads.keys()
    for name, g in want_grads.items():
        assert rel_err(got_grads[name], g) < 1e-5, name


def test_labels_must_match_the_ids():
    import pytest

    model = tiny_model(seed=13)
    ids = random_ids((2, S), seed=5)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="exclude each other"):
        model(ids, labels=ids, last_logits_only=True)
