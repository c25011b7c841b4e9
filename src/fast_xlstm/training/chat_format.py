"""Chat conversations -> token ids and a loss mask, for supervised fine-tuning.

The format is the one `fast-xlstm chat` speaks (`generation.chat.format_turn`), so a fine-tuned model
answers in the shape it was trained on:
```
<BOS>[system\\n\\n]User: question\\nAssistant: answer<EOS>\\nUser: question 2\\nAssistant: answer 2<EOS>
```
Only the answers and the EOS after each answer are trained (mask 1); BOS, system text and user
turns are prompt (mask 0). Each piece is tokenized on its own, as chat inference does.
"""

from __future__ import annotations

from typing import Any

from ..generation.chat import format_turn
from ..tokenizer import Tokenizer


def _check_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]]]:
    """Validates [{role, content}, ...] -> (system, [(user, assistant), ...])."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a chat record needs a non-empty list of messages")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"each message needs string 'role' and 'content', got {m!r}")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    want = ["user", "assistant"] * (len(messages) // 2)
    if not messages or len(messages) % 2 or roles != want:
        raise ValueError(f"messages must alternate user, assistant (after an optional system message) and end "
                         f"with an assistant reply; got roles {roles}")
    return system, [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]


def encode_chat(tokenizer: Tokenizer, messages: Any) -> tuple[list[int], list[int]]:
    """Returns (ids, mask): ids start with BOS; mask[j] = 1 where token j is a training target."""
    system, turns = _check_messages(messages)
    ids = [tokenizer.bos_token_id]
    mask = [0]
    for t, (user, answer) in enumerate(turns):
        prompt = tokenizer.encode(format_turn(user, first=t == 0, system=system), add_bos=False)
        reply = tokenizer.encode(answer if answer[:1].isspace() else " " + answer, add_bos=False)
        reply.append(tokenizer.eos_token_id)
        ids += prompt + reply
        mask += [0] * len(prompt) + [1] * len(reply)
    return ids, mask
