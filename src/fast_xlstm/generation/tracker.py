"""Host-side bookkeeping of one request: output ids, incremental text, stop ids and strings.

Shared by eager generation and the engine, so every path stops and streams identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model import ModelState
from ..tokenizer import Tokenizer
from .detokenizer import IncrementalDetokenizer
from .params import SamplingParams
from .sampling import resolve_seed


@dataclass
class StreamEvent:
    """One generated token of request `index`: the text it completed (maybe "") and, on the last
    event of a request, why it finished ("stop" or "length")."""

    index: int
    token_id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class GenerationOutput:
    """Result of one prompt. `state` has consumed the prompt and every generated token except the
    last one (which is in `token_ids` and, for chat, is fed at the start of the next turn)."""

    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    state: ModelState | None = None


class RequestTracker:
    """Accepts a request's sampled tokens one at a time and decides when it is finished."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 stop_ids: set[int]):
        self.params = params
        self.out = GenerationOutput(prompt_token_ids=prompt_ids)
        if params.logprobs is not None:
            self.out.logprobs, self.out.top_logprobs = [], []
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens) if tokenizer else None
        self.stop_ids = stop_ids
        self.seed = resolve_seed(params.seed)
        self.full_text = ""  # detokenized so far, before stop-string truncation
        self.emitted = 0  # characters of the final text already streamed
        self.hold = max((len(s) for s in params.stop), default=1) - 1  # chars a stop string may still claim

    def add_logprobs(self, logprob: float, top_vals: list[float], top_ids: list[int]) -> tuple[float, dict[int, float]]:
        """Records the chosen token's logprob and this request's top-k alternatives."""
        k = self.params.logprobs or 0
        top = dict(zip(top_ids[:k], top_vals[:k]))
        self.out.logprobs.append(logprob)
        self.out.top_logprobs.append(top)
        return logprob, top

    def accept(self, token: int) -> str:
        """Adds a sampled token, decides whether the request is finished; returns the text to stream."""
        out, p = self.out, self.params
        out.token_ids.append(token)
        if self.detok is not None:
            self.full_text += self.detok.step(token)
        if token in self.stop_ids or token in p.stop_token_ids:
            out.finish_reason, out.stop_reason = "stop", token
        elif len(out.token_ids) >= p.max_tokens:
            out.finish_reason = "length"
        if out.finish_reason and self.detok is not None:
            self.full_text += self.detok.flush()
        text = self.full_text
        # A stop string cannot start inside text already streamed: `hold` characters were kept back.
        found = [(at, s) for s in p.stop if (at := text.find(s, self.emitted)) >= 0]
        if found:
            at, s = min(found)  # the earliest stop string wins
            text = text[:at + (len(s) if p.include_stop_str_in_output else 0)]
            out.finish_reason, out.stop_reason = "stop", s
        out.text = text
        ready = len(text) if out.finish_reason else max(self.emitted, len(text) - self.hold)
        delta, self.emitted = text[self.emitted:ready], max(self.emitted, ready)
        return delta


def stop_token_ids(config_stop_ids: list[int], tokenizer: Tokenizer | None) -> set[int]:
    """Ids that end generation unless `ignore_eos`: the config's eos ids, id 0 and the tokenizer's eos."""
    ids = set(config_stop_ids)
    if tokenizer is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
