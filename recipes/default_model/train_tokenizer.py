"""Step 2: a byte-level BPE tokenizer (8,192 tokens) trained on the corpus with `tokenizers`.

Ids 0 `<|endoftext|>` (BOS/EOD, as in the 7B's GPT-NeoX tokenizer) and 1 `<|padding|>` come first.
Deterministic for a given corpus.

    python recipes/default_model/train_tokenizer.py data/shakespeare/texts data/shakespeare/tokenizer
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 8192


def main(texts: str, out: str) -> int:
    files = sorted(str(p) for p in Path(texts).glob("*.txt"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out) / "tokenizer.json"))
    print(f"tokenizer with {tok.get_vocab_size()} tokens -> {out}/tokenizer.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
