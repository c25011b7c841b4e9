"""Chat messages -> prompt ids: the documented default format (pieces tokenized on their own, as
in training) and a tokenizer's Jinja chat template (sandboxed, transformers' conventions)."""

from __future__ import annotations

import pytest

from fast_xlstm.loading import tiny_tokenizer_dir
from fast_xlstm.server.chat_template import ChatFormatter, ChatTemplateError
from fast_xlstm.tokenizer import Tokenizer


@pytest.fixture
def tok() -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir())


def _m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_default_format(tok):
    f = ChatFormatter(tok)
    one = f.encode([_m("system", "Be brief."), _m("user", "Hi")])
    assert one == tok.encode("Be brief.\n\nUser: Hi\nAssistant:")
    conv = [_m("user", "Hi"), _m("assistant", "Hello"), _m("user", "And?")]
    ids = f.encode(conv)
    expected = (tok.encode("User: Hi\nAssistant:") + tok.encode(" Hello", add_bos=False) + [tok.eos_token_id]
                + tok.encode("\nUser: And?\nAssistant:", add_bos=False))
    assert ids == expected
    # A turn's prompt extends the previous turn's prompt (then its reply and EOS): what a session keeps.
    first = f.encode(conv[:1])
    assert ids[:len(first)] == first
    # Continuing an assistant message: no generation prompt, no EOS after it.
    cont = f.encode(conv[:2], add_generation_prompt=False)
    assert cont == tok.encode("User: Hi\nAssistant:") + tok.encode(" Hello", add_bos=False)
    # Same-role runs are joined.
    assert f.encode([_m("user", "a"), _m("user", "b")]) == f.encode([_m("user", "a\nb")])


@pytest.mark.parametrize("messages,words", [
    ([_m("assistant", "x")], "user message before"),
    ([_m("user", "x"), _m("system", "late")], "must come before"),
    ([_m("user", "x"), _m("tool", "out")], "not supported"),
    ([_m("user", "x"), _m("assistant", "y")], "last message must be the user"),
])
def test_default_format_errors(tok, messages, words):
    with pytest.raises(ChatTemplateError, match=words):
        ChatFormatter(tok).encode(messages)


def test_jinja_template(tok):
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    f = ChatFormatter(tok)
    msgs = [_m("user", "a<b & c")]
    assert f.render(msgs) == "<|endoftext|><user>a<b & c<assistant>"
    assert f.encode(msgs) == tok.encode("<|endoftext|><user>a<b & c<assistant>")
    assert f.encode(msgs)[0] == tok.bos_token_id and f.encode(msgs)[1] != tok.bos_token_id  # BOS once


def test_jinja_template_helpers_and_sandbox(tok):
    tok.chat_template = ("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}"
                         "{{ messages | tojson }}")
    f = ChatFormatter(tok)
    assert f.render([_m("user", "é<")]) == '[{"role": "user", "content": "é<"}]'  # no HTML escaping
    with pytest.raises(ChatTemplateError, match="first must be user"):
        f.encode([_m("assistant", "x")])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"  # the sandbox refuses attribute games
    with pytest.raises(ChatTemplateError):
        ChatFormatter(tok).encode([_m("user", "x")])
