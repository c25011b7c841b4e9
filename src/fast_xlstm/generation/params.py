"""SamplingParams: per-request decoding settings (vLLM-style), validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "GREEDY_EPS"]

# Temperatures below this are treated as greedy (argmax), as in vLLM.
GREEDY_EPS = 1e-5


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _number(name: str, value: Any, allowed: str, ok: bool) -> float:
    """Check a real-valued field: a finite int/float satisfying ``ok``; returns it as float."""
    if not _is_number(value):
        raise ValueError(f"{name} must be a number {allowed}, got {value!r} ({type(value).__name__})")
    if math.isnan(value) or not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    Args:
        temperature: >= 0; 0 means greedy (argmax). Default 1.0.
        top_k: keep the k most likely tokens; 0 or -1 disables.
        top_p: nucleus sampling mass in (0, 1]; 1 disables.
        min_p: keep tokens with prob >= min_p * max prob, in [0, 1]; 0 disables.
        repetition_penalty: > 0; HF/vLLM semantics on tokens seen in prompt or output (positive
            logits are divided by it, negative ones multiplied); 1 disables.
        presence_penalty: in [-2, 2]; OpenAI semantics, subtracted once from every token generated.
        frequency_penalty: in [-2, 2]; OpenAI semantics, subtracted per occurrence in the output.
        seed: per-request RNG seed (reproducible regardless of batch composition), or None.
        max_tokens: >= 1, the most tokens to generate.
        stop_token_ids: extra token ids that end generation (the stop token is kept in the ids).
        stop: strings that end generation; the output text is cut before the stop string unless
            ``include_stop_str_in_output``. A single string is accepted.
        include_stop_str_in_output: keep the matched stop string in the output text.
        ignore_eos: keep generating past the tokenizer's EOS / BOS ids.
        logprobs: None, or how many top alternatives to report per token (>= 0).
        skip_special_tokens: drop special tokens when detokenizing the output.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.temperature = _number("temperature", self.temperature, "finite and >= 0", self._ge(self.temperature, 0))
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= -1 (0 or -1 disables), got {self.top_k!r}")
        self.top_p = _number("top_p", self.top_p, "in (0, 1]", self._in(self.top_p, 0, 1, open_low=True))
        self.min_p = _number("min_p", self.min_p, "in [0, 1]", self._in(self.min_p, 0, 1))
        self.repetition_penalty = _number(
            "repetition_penalty", self.repetition_penalty, "> 0 and finite", self._gt_finite(self.repetition_penalty)
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            setattr(self, name, _number(name, value, "in [-2, 2]", self._in(value, -2, 2)))
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        self.stop_token_ids = self._stop_token_ids(self.stop_token_ids)
        self.stop = self._stop_strings(self.stop)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {self.logprobs!r}")

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _ge(x: Any, low: float) -> bool:
        return _is_number(x) and x >= low and x != math.inf

    @staticmethod
    def _gt_finite(x: Any) -> bool:
        return _is_number(x) and math.isfinite(x) and x > 0

    @staticmethod
    def _in(x: Any, low: float, high: float, open_low: bool = False) -> bool:
        return _is_number(x) and (x > low if open_low else x >= low) and x <= high

    @staticmethod
    def _stop_token_ids(value: Any) -> list[int]:
        if value is None:
            return []
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of ints >= 0, got {value!r}")
        ids = list(value)
        for i in ids:
            if not _is_int(i) or i < 0:
                raise ValueError(f"stop_token_ids must be a list of ints >= 0, got element {i!r}")
        return ids

    @staticmethod
    def _stop_strings(value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {value!r}")
        for s in value:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got element {s!r}")
        return list(value)

    # --------------------------------------------------------------- properties
    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax (temperature below ``GREEDY_EPS``)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
