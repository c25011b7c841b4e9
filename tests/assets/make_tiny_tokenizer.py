"""Train the tiny byte-level BPE tokenizer shipped with the package for the tiny demo model.

Deterministic: the same text and settings give the same tokenizer.json byte for byte.
Layout mirrors GPT-NeoX-20B (the xLSTM 7B tokenizer): id 0 ``<|endoftext|>``, id 1 ``<|padding|>``,
then the 256 byte-level symbols in code-point order (so id 2 is ``!``, as in GPT-NeoX), then merges.
NFC normalizer, ByteLevel pre-tokenizer (no prefix space), ByteLevel post-processor and decoder.

Run: ``python tests/assets/make_tiny_tokenizer.py [OUT_PATH]``
(default OUT_PATH: ``src/fast_xlstm/assets/tiny/tokenizer.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|padding|>"]
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "src" / "fast_xlstm" / "assets" / "tiny" / "tokenizer.json"

# Original prose written for this file; free to use for any purpose.
TEXT = """\
The lighthouse keeper woke before the gulls. Every morning he climbed the spiral stairs, counted
the one hundred and twelve steps, and wiped the salt from the great lens with a soft grey cloth.
He kept a notebook on the windowsill where he wrote the weather, the ships he saw, and the small
thoughts that came to him while the kettle boiled. Most days the notebook said very little:
wind from the west, two fishing boats, fog until noon. Some days it said more.

In the spring a girl from the village began to bring him bread. She was curious about everything:
why the lamp turned, why the glass was cut into rings, why the light could be seen so far away
when a candle in a kitchen could barely light a table. He explained that the rings bent the light
the way a river bends around a stone, gathering it into a single bright beam that travelled across
the water. She listened, frowned, and asked whether the beam ever got tired. He laughed and said
that it did not, but that he sometimes did.

Summer brought visitors with cameras and questions. They wanted to know whether the keeper was
lonely, whether he had seen storms, whether the tower was haunted. He answered patiently. Yes, he
had seen storms; the worst one had thrown spray over the gallery and rattled every window in the
tower. No, it was not haunted, though the wind made strange music in the railings at night.
Lonely? He thought about that question longer than the others. The sea was company, he said, and
so were the birds, and so was the girl who brought the bread.

Autumn was the season of repairs. He painted the door, oiled the clockwork, replaced a cracked pane
and carried new wicks up from the storeroom. The days grew shorter and the lamp burned longer. In
the evenings he read old books about navigation, about stars and tides and the patient arithmetic
that sailors once used to find their way home. He copied tables of numbers into his notebook:
1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144. He did not need them, but he liked the shape they made.

Winter arrived with a storm that lasted three days. On the second night the power failed, and the
keeper lit the old oil lamp by hand, as keepers had done a hundred years before. He stayed awake
until dawn, trimming the wick and watching the dark water for any sign of a ship in trouble. In the
morning the radio crackled with thanks from a freighter that had passed safely in the night.

A small program reads a file, counts the words, and prints the ten most common ones. First it opens
the file and reads each line. Then it splits every line into words, turns them into lower case, and
adds one to a counter for each word. At the end it sorts the counters and prints the largest. The
program is short, but it teaches the basic ideas: input, loops, dictionaries, sorting and output.
def count_words(path):
    counts = {}
    for line in open(path):
        for word in line.lower().split():
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])[:10]

Recurrent networks read a sequence one token at a time and carry a state forward. The state has a
fixed size, so the cost of each new token does not grow with the length of the text. A memory cell
decides what to write, what to keep, and what to forget, using gates that open and close. When the
gates are exponential, the cell can revise its memory quickly, and a matrix memory can store many
associations at once. Training such a model means showing it many documents and adjusting its
weights so that it predicts the next token a little better each time.

Travel notes. Zürich was cold and clear; the trams were punctual and the coffee was strong. In
München we ate Brezeln and Weißwurst, and a waiter told us that the beer garden opens when the
chestnut trees bloom. Die Straße war nass, die Bäume waren grün, und über dem Fluss lag Nebel.
Schöne Grüße aus Köln! In Paris we visited a café near the Seine, drank a crème brûlée espresso
and argued about whether the façade of the old théâtre was Gothic or merely gloomy. ¿Dónde está la
estación? asked a traveller from Málaga. Ελληνικά γράμματα: άλφα, βήτα, γάμμα, δέλτα. Русский текст:
привет, как дела? Мы читали книги и пили чай.

東京の朝はとても静かです。私は駅まで歩いて、電車に乗りました。今日は天気がいいので、公園で本を
読みます。日本語の文章は空白がないので、トークナイザーにとって難しいです。中文也是一样：我们今天
去图书馆看书，然后在咖啡馆喝茶。한국어 문장도 있습니다: 안녕하세요, 만나서 반갑습니다.

Symbols and emoji: 🙂 😀 🚀 🌍 🎉 ❤️ 👍🏽 ✨ 🐍 🦀 🧪 — the rocket 🚀 launched, the planet 🌍 turned, and
the party 🎉 began. Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π ≈ 3.14159, € 12,50 and £ 7.20 and ¥ 500. Arrows → ← ↑ ↓.
Quotes “like this” and ‘like that’, an ellipsis… and a dash – or two — done.

The harbour town woke slowly. Bakers opened their shutters, fishermen mended nets, and children
ran down the hill towards the school with their coats flapping like sails. The old keeper watched
them from the gallery and wrote in his notebook: clear sky, light wind from the north, a good day.
He closed the book, went down the one hundred and twelve steps, and put the kettle on the stove.
<|endoftext|>
"""


def build_tokenizer(text: str = TEXT, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``text`` (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One training sequence per paragraph.
    docs = [d.strip() for d in text.replace("<|endoftext|>", "").split("\n\n") if d.strip()]
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def main(out: Path = DEFAULT_OUT) -> Path:
    tok = build_tokenizer()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out), pretty=False)
    return out


if __name__ == "__main__":
    path = main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
    t = Tokenizer.from_file(str(path))
    print(f"wrote {path} ({path.stat().st_size} bytes, vocab {t.get_vocab_size()})")
