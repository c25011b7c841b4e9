"""Chat messages -> prompt token ids.

With a `chat_template` in the checkpoint's tokenizer_config.json, the messages are rendered by
Jinja2 in a sandbox, the way transformers renders them (`trim_blocks`, `lstrip_blocks`, the
`loopcontrols` extension, `raise_exception`, `tojson` and `strftime_now`; variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`), then tokenized (BOS is prepended unless the
rendered text starts with it).

Without one, the default is the plain format that `fast-xlstm chat` speaks and
`training.chat_format` trains on, each piece tokenized on its own as in training:
```
<BOS>[system\\n\\n]User: question\\nAssistant: answer<EOS>\\nUser: question 2\\nAssistant:
```
System (and developer) messages must come first; consecutive messages of one role are joined with
a newline; user and assistant then alternate, starting with the user. With `add_generation_prompt`
(the default) the last message is the user's and the prompt ends with `Assistant:`; without it the
last message is an assistant's, continued as is (no EOS after it). An assistant answer not starting
with whitespace gets one space before it (the model writes `Assistant: answer`).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..generation.chat import format_turn
from ..tokenizer import Tokenizer

Message = dict[str, str]  # {"role": ..., "content": ...}


class ChatTemplateError(ValueError):
    """The messages do not fit the template (the server answers 400 about `messages`)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own `tojson` escapes HTML characters, which a chat prompt must not get.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """A sandboxed Jinja2 template (cached: a server renders the same template for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"the tokenizer's chat_template does not compile: {e}") from e


def _merge_roles(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]]]:
    """Default format: (system text, [(role, text)]) with same-role runs joined."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for j, m in enumerate(messages):
        role, text = m["role"], m["content"]
        if role in ("system", "developer"):
            if turns:
                raise ChatTemplateError(f"messages[{j}]: a {role} message must come before the conversation "
                                        f"in the default chat format")
            system.append(text)
        elif role in ("user", "assistant"):
            if turns and turns[-1][0] == role:
                turns[-1] = (role, f"{turns[-1][1]}\n{text}")
            else:
                turns.append((role, text))
        else:
            raise ChatTemplateError(f"messages[{j}]: role {role!r} is not supported by the default chat format")
    if not turns or turns[0][0] != "user":
        raise ChatTemplateError("messages must hold a user message before any assistant message")
    return ("\n".join(system) if system else None), turns


class ChatFormatter:
    """Turns messages into prompt ids with the tokenizer's template, or the default format."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.template = compile_template(tokenizer.chat_template) if tokenizer.chat_template else None

    def encode(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages` ([{"role", "content"}]); raises ChatTemplateError on bad input."""
        if self.template is not None:
            return self.tokenizer.encode(self.render(messages, add_generation_prompt))
        return self._encode_default(messages, add_generation_prompt)

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The Jinja template's text for `messages`."""
        assert self.template is not None
        tok = self.tokenizer
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e

    def _encode_default(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        tok = self.tokenizer
        system, turns = _merge_roles(messages)
        last = turns[-1][0]
        if add_generation_prompt and last != "user":
            raise ChatTemplateError("the last message must be the user's (or set add_generation_prompt to false "
                                    "to continue the assistant's message)")
        if not add_generation_prompt and last != "assistant":
            raise ChatTemplateError("with add_generation_prompt false the last message must be the assistant's")
        ids = [tok.bos_token_id] if tok.add_bos else []
        for t, (role, text) in enumerate(turns):
            if role == "user":
                ids += tok.encode(format_turn(text, first=t == 0, system=system), add_bos=False)
            else:
                ids += tok.encode(text if text[:1].isspace() else " " + text, add_bos=False)
                if t < len(turns) - 1:  # a finished answer ends with EOS; the one being continued does not
                    ids.append(tok.eos_token_id)
        return ids
