"""The bundled default model: it loads, matches its model card on a shipped held-out slice, and
greedy generation is deterministic."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from fast_xlstm import SamplingParams, generate
from fast_xlstm.loading import default_model_dir, load

HELDOUT = Path(__file__).parent / "assets" / "shakespeare_heldout.txt"


def _card_perplexity() -> float:
    card = (default_model_dir() / "README.md").read_text(encoding="utf-8")
    match = re.search(r"\| test slice \|.*perplexity ([0-9.]+)", card)
    assert match, "the model card must state the test slice's perplexity"
    return float(match.group(1))


def test_bundled_model_is_the_default_and_small():
    files = {p.name for p in default_model_dir().iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in default_model_dir().iterdir()) < 40e6
    loaded = load(None, device="cpu")
    assert not loaded.random_weights and "bundled default model" in loaded.source
    assert 10e6 < loaded.model.num_parameters() < 30e6


@torch.inference_mode()
def test_heldout_perplexity_within_the_card():
    loaded = load(None, device="cpu", dtype="float32")
    ids = torch.tensor([loaded.tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))])
    logits, _ = loaded.model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    assert math.isfinite(nll)
    assert math.exp(nll) <= 1.1 * _card_perplexity()


def test_greedy_generation_is_deterministic_text():
    loaded = load(None, device="cpu")
    params = SamplingParams(temperature=0, max_tokens=24)
    a = generate(loaded.model, loaded.tokenizer, "ROMEO.", params)[0]
    b = generate(loaded.model, loaded.tokenizer, "ROMEO.", params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    words = re.findall(r"[A-Za-z']+", a.text)
    assert len(words) >= 3  # real words, not byte noise
