import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers import processors

import fast_xlstm
from fast_xlstm import config, loading
from fast_xlstm.generation.detokenizer import IncrementalDetokenizer
from fast_xlstm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHIPPED = Path(fast_xlstm.__file__).parent / "assets" / "tiny" / "tokenizer.json"


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    shutil.copy(SHIPPED, tmp_path / "tokenizer.json")
    return tmp_path


def _with_bos_post_processor(src: Path, dst_dir: Path) -> Path:
    """A copy whose post-processor adds <|endoftext|> itself, like some hub tokenizer.json files."""
    backend = tokenizers.Tokenizer.from_file(str(src))
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", 0)]
    )
    dst_dir.mkdir()
    backend.save(str(dst_dir / "tokenizer.json"))
    assert backend.encode("hi").ids[0] == 0
    return dst_dir


def test_shipped_tiny_tokenizer_layout() -> None:
    assert SHIPPED.stat().st_size < 100_000
    tok = Tokenizer.from_file(SHIPPED)
    assert tok.vocab_size == 1024
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|padding|>", "!"]
    assert tok.bos_token_id == 0 and tok.eos_token_id == 0 and tok.bos_token == "<|endoftext|>"
    assert tok.chat_template is None


def test_shipped_tokenizer_is_reproduced_by_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", REPO / "tests/assets/make_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    out = module.main(tmp_path / "tokenizer.json")
    assert out.read_bytes() == SHIPPED.read_bytes()


def test_encode_prepends_single_bos(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode("Hello world")
    assert ids[0] == 0 and ids[1] != 0
    assert tok.encode("Hello world", add_bos=False) == ids[1:]
    assert tok.encode("<|endoftext|>Hello world") == ids
    assert tok.encode("") == [0]
    assert Tokenizer.from_dir(tok_dir, add_bos=False).encode("Hello world") == ids[1:]
    assert tok.encode_batch(["Hello world", "Grüße 🚀"]) == [ids, tok.encode("Grüße 🚀")]


def test_post_processor_bos_is_not_doubled(tok_dir: Path, tmp_path: Path) -> None:
    plain = Tokenizer.from_dir(tok_dir)
    tok = Tokenizer.from_dir(_with_bos_post_processor(SHIPPED, tmp_path / "bos"))
    assert tok.encode("Hello world") == plain.encode("Hello world")
    assert tok.encode("Hello world").count(0) == 1
    assert 0 not in tok.encode("Hello world", add_bos=False)


def test_decode_roundtrip_and_special_tokens(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    text = "Zürich, 東京, 🚀 and ❤️!"
    ids = tok.encode(text)
    assert tok.decode(ids) == "<|endoftext|>" + text
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.token_to_id("<|padding|>") == 1 and tok.token_to_id("no-such-token") is None
    assert tok.id_to_token(0) == "<|endoftext|>"


def test_tokenizer_config(tok_dir: Path) -> None:
    config = {"chat_template": "{{ messages }}", "eos_token": {"content": "<|padding|>"}}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tok_dir)
    assert tok.chat_template == "{{ messages }}" and tok.eos_token_id == 1 and tok.eos_token == "<|padding|>"
    assert Tokenizer.from_dir(tok_dir, eos_token_id=2).eos_token_id == 2
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tok_dir)


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_file(missing / "tokenizer.json")


def test_malformed_files_raise_value_error(tok_dir: Path, tmp_path: Path) -> None:
    (tok_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tok_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match=str(bad)):
        Tokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_text("")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(bad / "tokenizer.json")


def test_bad_special_ids(tok_dir: Path) -> None:
    with pytest.raises(ValueError, match="bos_token_id"):
        Tokenizer.from_dir(tok_dir, bos_token_id=5000)
    with pytest.raises(ValueError, match="eos_token_id"):
        Tokenizer.from_dir(tok_dir, eos_token_id=-1)
    with pytest.raises(TypeError):
        Tokenizer.from_dir(tok_dir).encode(b"bytes")  # type: ignore[arg-type]


def test_placeholder_tokens_make_every_id_decode_to_text() -> None:
    """A random-weight preset's ids past the demo vocabulary must stream text (one chunk per token,
    as with a real checkpoint's tokenizer); ids inside it must decode and encode as before."""
    plain = Tokenizer.from_file(SHIPPED)
    tok = Tokenizer.from_file(SHIPPED)
    assert tok.add_placeholder_tokens(3000) == 3000 - 1024
    assert tok.vocab_size == 3000
    rng = random.Random(0)
    for i in rng.sample(range(1024, 3000), 50) + [1024, 2999]:
        assert tok.decode([i]) == f" t{i}"
    low = [rng.randrange(3, 1024) for _ in range(64)]
    assert tok.decode(low) == plain.decode(low)
    text = "To be, or not to be: that is the question."
    assert tok.encode(text) == plain.encode(text)
    # Streamed: every placeholder id yields its text at once (nothing held back).
    detok = IncrementalDetokenizer(tok)
    for i in rng.sample(range(1024, 3000), 20):
        assert detok.step(i) == f" t{i}"
    assert tok.add_placeholder_tokens(3000) == 0  # already covered: nothing to add
    with pytest.raises(ValueError, match="vocab_size must be an int >= the tokenizer's 3000"):
        tok.add_placeholder_tokens(2000)


def test_wide_vocab_preset_loads_with_placeholder_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """`load` of a preset whose vocabulary is larger than the demo tokenizer's covers every id."""
    monkeypatch.setitem(config.PRESETS, "test-wide-vocab",
                        lambda: config.XLSTMConfig(vocab_size=2048, embedding_dim=64, num_blocks=1, num_heads=2))
    loaded = loading.load("test-wide-vocab", device="cpu")
    assert loaded.tokenizer.vocab_size == loaded.model.config.vocab_size == 2048
    assert loaded.tokenizer.decode([5, 2047]) == plain_decode(5) + " t2047"
    assert loaded.random_weights


def plain_decode(i: int) -> str:
    return Tokenizer.from_file(SHIPPED).decode([i])
