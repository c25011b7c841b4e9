"""Incremental detokenization: token ids in, text deltas out, O(1) amortized per token.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix gives a
trailing U+FFFD that a later token turns into the real character. Like vLLM / TGI we decode only a
small window of recent tokens: ``decode(ids[prefix_offset:])``, where ``prefix_offset`` is a token
boundary at which the text was complete. We emit everything up to the last character, and the last
character too unless it is U+FFFD (only the final character of a lossy decode can still change).
The window also keeps the previous chunk as context, so decoders that strip a leading space on the
first token (SentencePiece) still produce the right spacing.

Cost per token is O(tokens since the last token boundary that fell between complete characters),
in practice 1 to 3 tokens.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Feed generated token ids one at a time with ``step``; ``flush`` once at the end.

    The concatenation of all returned deltas equals ``tokenizer.decode(all_ids)`` exactly (for
    byte-level BPE), and no delta contains a U+FFFD that stands for a still-incomplete character.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``: our ``Tokenizer`` or a
            ``tokenizers.Tokenizer``.
        skip_special_tokens: passed to ``decode``.
    """

    def __init__(self, tokenizer: _Decoder, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # window start: a clean token boundary, text before it all emitted
        self._read_offset = 0  # latest clean token boundary (>= prefix_offset)
        self._emitted = 0  # characters of decode(ids[prefix_offset:]) already emitted
        self._pieces: list[str] = []

    def _decode(self, start: int) -> str:
        return self._tokenizer.decode(self.token_ids[start:], skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Append one token id; return the newly completed text (possibly "")."""
        self.token_ids.append(int(token_id))
        window = self._decode(self._prefix_offset)
        complete = not window.endswith(_REPLACEMENT)
        stable = window if complete else window[:-1]
        delta = stable[self._emitted :]
        self._emitted = max(self._emitted, len(stable))
        if complete:
            # Every token boundary where the text is complete is a clean split point. Slide the
            # window so that it starts at the previous clean boundary (one chunk of context).
            if self._read_offset > self._prefix_offset:
                self._prefix_offset = self._read_offset
                self._emitted = len(self._decode(self._prefix_offset))
            self._read_offset = len(self.token_ids)
        if delta:
            self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Return whatever is still held back (a trailing U+FFFD that never completed)."""
        delta = self._decode(self._prefix_offset)[self._emitted :]
        self._emitted += len(delta)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def __len__(self) -> int:
        return len(self.token_ids)
