import random

import pytest

from fast_xlstm.generation.detokenizer import IncrementalDetokenizer
from fast_xlstm.tokenizer import Tokenizer

TEXT = (
    "Grüße aus Köln! Die Straße war nass. 東京の朝はとても静かです。中文也是一样。"
    " Emoji 🚀🌍🎉👍🏽 and ❤️ … “quotes” — π ≈ 3.14159 € 12,50. Привет, как дела?"
)


def _byte_token_ids(tok: Tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte (byte-level alphabet: printable bytes map to themselves)."""
    table = _bytes_to_unicode()
    ids = [tok.token_to_id(table[b]) for b in data]
    assert all(i is not None for i in ids)
    return ids  # type: ignore[return-value]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _stream(tok, ids: list[int], skip: bool = False) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    deltas = [detok.step(i) for i in ids]
    deltas.append(detok.flush())
    return deltas, detok


def test_stream_of_real_text_matches_decode_without_partial_chars(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(TEXT, add_bos=False)
    # The tiny tokenizer has tokens that end inside a multi-byte character.
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)
    deltas, detok = _stream(tiny_tokenizer, ids)
    assert "".join(deltas) == tiny_tokenizer.decode(ids) == TEXT
    assert detok.text == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_emits_characters_as_soon_as_complete(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode("日本語", add_bos=False)
    detok = IncrementalDetokenizer(tiny_tokenizer)
    seen = ""
    for n, i in enumerate(ids, 1):
        seen += detok.step(i)
        # Everything but a still-incomplete last character is out already.
        assert seen == tiny_tokenizer.decode(ids[:n]).removesuffix("\ufffd")
    assert seen == "日本語"


def test_split_inside_4_byte_emoji(tiny_tokenizer: Tokenizer) -> None:
    ids = _byte_token_ids(tiny_tokenizer, "A😀B".encode())
    assert len(ids) == 6
    deltas, _ = _stream(tiny_tokenizer, ids)
    assert deltas == ["A", "", "", "", "😀", "B", ""]
    # Two tokens each holding half of the emoji's bytes, if the vocab merged them, behave alike.
    half = _byte_token_ids(tiny_tokenizer, "😀".encode()[:2])
    deltas, _ = _stream(tiny_tokenizer, [*half, *_byte_token_ids(tiny_tokenizer, "😀".encode()[2:])])
    assert "".join(deltas) == "😀" and deltas[-2] == "😀"


def test_incomplete_tail_is_flushed(tiny_tokenizer: Tokenizer) -> None:
    ids = _byte_token_ids(tiny_tokenizer, b"ok \xf0\x9f")
    deltas, _ = _stream(tiny_tokenizer, ids)
    assert deltas[:-1] == ["o", "k", " ", "", ""]
    assert deltas[-1] == "\ufffd" == tiny_tokenizer.decode(ids)[-1]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_random_token_streams_reassemble_exactly(tiny_tokenizer: Tokenizer, seed: int, skip: bool) -> None:
    rng = random.Random(seed)
    byte_ids = _byte_token_ids(tiny_tokenizer, bytes(range(0x80, 0x100)))  # continuation/lead bytes
    vocab = tiny_tokenizer.vocab_size
    ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(vocab) for _ in range(300)]
    deltas, _ = _stream(tiny_tokenizer, ids, skip)
    assert "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=skip)


def test_works_with_raw_tokenizers_backend(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(TEXT)
    deltas, _ = _stream(tiny_tokenizer.backend, ids, skip=True)
    assert "".join(deltas) == TEXT
    deltas, _ = _stream(tiny_tokenizer.backend, ids, skip=False)
    assert "".join(deltas) == "<|endoftext|>" + TEXT


class _SpyDecoder:
    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_decodes_only_a_small_window(tiny_tokenizer: Tokenizer) -> None:
    ids = tiny_tokenizer.encode(TEXT * 20, add_bos=False)
    spy = _SpyDecoder(tiny_tokenizer)
    deltas, detok = _stream(spy, ids)
    assert "".join(deltas) == TEXT * 20 and len(detok) == len(ids) > 1000
    assert max(spy.lengths) <= 16
    assert len(spy.lengths) <= 2 * len(ids) + 1
