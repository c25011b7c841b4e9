"""Multi-turn chat that keeps the recurrent state between turns.

A turn prefills only its new tokens on top of the state left by the previous turn: the history is
never re-read, and a turn costs the same whatever the conversation's length. The tokens the state
has seen are exactly `history`: running them from scratch gives the same state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from ..model import ModelState, XLSTMForCausalLM
from ..tokenizer import Tokenizer
from .generate import GenerationOutput, stream_generate
from .params import SamplingParams

USER_PREFIX, ASSISTANT_PREFIX = "User: ", "Assistant:"


def format_turn(message: str, *, first: bool, system: str | None = None) -> str:
    """Plain-text chat format used when no template is given:
    `[system\\n\\n]User: message\\nAssistant:`, later turns preceded by a newline."""
    head = (f"{system}\n\n" if system else "") if first else "\n"
    return f"{head}{USER_PREFIX}{message}\n{ASSISTANT_PREFIX}"


class ChatSession:
    """Holds one conversation's state. `send(message)` streams the reply as text deltas."""

    def __init__(self, model: XLSTMForCausalLM, tokenizer: Tokenizer, params: SamplingParams | None = None, *,
                 system: str | None = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        base = params or SamplingParams(max_tokens=256)
        self.params = dataclasses.replace(base, stop=list(base.stop) + [f"\n{USER_PREFIX.strip()}"])
        self.reset()

    def reset(self) -> None:
        self.state: ModelState | None = None
        self.pending: list[int] = []  # last sampled token: not yet fed to the state
        self.history: list[int] = []  # every token the state has consumed
        self.turns = 0
        self.last_prefill_tokens = self.last_generated_tokens = 0

    @property
    def history_tokens(self) -> int:
        return len(self.history)

    def send(self, message: str) -> Iterator[str]:
        if not message:
            raise ValueError("chat message is empty")
        first = self.state is None
        text = format_turn(message, first=first, system=self.system)
        ids = self.pending + self.tokenizer.encode(text, add_bos=first and self.tokenizer.add_bos)
        outputs: list[GenerationOutput] = []
        for event in stream_generate(self.model, self.tokenizer, [ids], self.params, states=self.state,
                                     outputs=outputs):
            if event.text:
                yield event.text
        out = outputs[0]
        self.turns += 1
        self.last_prefill_tokens, self.last_generated_tokens = len(ids), len(out.token_ids)
        self.history += ids + out.token_ids[:-1]
        self.state = out.state
        last = out.token_ids[-1]
        # A stop token ends the turn without entering the state; any other last token is fed next turn.
        self.pending = [] if out.finish_reason == "stop" and out.stop_reason == last else [last]
