"""Supervised fine-tuning on chat jsonl: the loss sees only the assistant replies (and their EOS)."""

from __future__ import annotations

import json

import pytest
import torch

from fast_xlstm.loading import tiny_tokenizer_dir
from fast_xlstm.tokenizer import Tokenizer
from fast_xlstm.training.chat_format import encode_chat
from fast_xlstm.training.corpus import TokenCorpus
from fast_xlstm.training.data import IGNORE_INDEX, PackedLoader
from fast_xlstm.training.packing import loss_sum

from trainutil import golden_config, prepare_tiny_data, run_in_process, step_records

CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "Red, of course."}],
    [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "On the quiet hill."}],
] * 20


def test_encode_chat_masks_everything_but_the_replies():
    tok = Tokenizer.from_dir(tiny_tokenizer_dir())
    ids, mask = encode_chat(tok, CHATS[0])
    assert ids[0] == 0 and mask[0] == 0
    trained = [i for i, m in zip(ids, mask) if m]
    eos = tok.eos_token_id
    assert tok.decode(trained) == " Blue." + tok.decode([eos]) + " Red, of course." + tok.decode([eos])
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m][1:])
    assert prompt == "Be brief.\n\nUser: Name a colour.\nAssistant:\nUser: Another?\nAssistant:"
    with pytest.raises(ValueError, match="alternate"):
        encode_chat(tok, [{"role": "assistant", "content": "hi"}])


def test_chat_data_trains_only_on_replies(tmp_path):
    pytest.importorskip("datasets")
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    prepare_tiny_data(tmp_path / "data", [src], chat=True, val_fraction=0.0)
    corpus = TokenCorpus(tmp_path / "data" / "train")
    assert corpus.has_mask
    batch = PackedLoader(corpus, seq_len=48, micro_batch_size=2, shuffle=False).next_step(1)[0]
    tok = Tokenizer.from_dir(tiny_tokenizer_dir())
    expect_mask = torch.tensor(sum((encode_chat(tok, m)[1] for m in CHATS[:2]), []))  # first two documents
    flat_labels = batch.labels.reshape(-1)
    assert torch.equal(flat_labels[:40] != IGNORE_INDEX, expect_mask[1:41].bool())

    # The loss and its gradient ignore prompt positions entirely.
    logits = torch.randn(*batch.labels.shape, 1024, requires_grad=True)
    loss_sum(logits, batch.labels).backward()
    prompt = batch.labels == IGNORE_INDEX
    assert prompt.any() and (~prompt).any()
    assert logits.grad[prompt].abs().max() == 0 and logits.grad[~prompt].abs().sum() > 0
    changed = logits.detach().clone()
    changed[prompt] += 100 * torch.randn_like(changed[prompt])
    assert torch.equal(loss_sum(changed, batch.labels), loss_sum(logits.detach(), batch.labels))

    # And a short fine-tune on it runs (loss only over reply tokens).
    cfg = golden_config(tmp_path / "data", tmp_path / "run", **{"train.steps": 3, "train.eval_every": 0,
                                                                 "data.seq_len": 48})
    assert run_in_process(cfg) == 0
    assert sorted(step_records(tmp_path / "run")) == [1, 2, 3]
