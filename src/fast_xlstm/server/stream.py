"""The messages between the HTTP routes and the engine thread: what a route submits (`SubRequest`),
what comes back per engine step (`Delta`, a snapshot) and the per-request async iterator of those
(`RequestStream`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..generation.params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine thread failed or stopped; no request can be served any more."""


@dataclass
class SubRequest:
    """One engine request of an API request: prompt ids, sampling settings, optional session."""

    prompt_ids: list[int]
    params: SamplingParams
    session_id: str | None = None


@dataclass(frozen=True)
class Delta:
    """What one engine step produced for one choice (a snapshot: safe to read on the event loop).

    `logprobs` / `top_logprobs` cover `token_ids` (None when not asked for). On the last delta of a
    choice, `finish_reason` is set and `text` completes the choice's final text.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_tokens: int
    cached_tokens: int
    num_generated: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, later: "Delta") -> "Delta":
        """This delta followed by `later` (same choice) as one delta."""
        def cat(a: list | None, b: list | None) -> list | None:
            return None if a is None and b is None else (a or []) + (b or [])
        return Delta(index=self.index, text=self.text + later.text, token_ids=self.token_ids + later.token_ids,
                     logprobs=cat(self.logprobs, later.logprobs), top_logprobs=cat(self.top_logprobs, later.top_logprobs),
                     finish_reason=later.finish_reason, stop_reason=later.stop_reason,
                     prompt_tokens=later.prompt_tokens, cached_tokens=later.cached_tokens,
                     num_generated=later.num_generated)


class RequestStream:
    """The deltas of one API request's engine requests, as an async iterator of `Delta`.

    Ends when every choice has finished; raises `EngineDeadError` if the engine fails meanwhile.
    Deltas of one choice that are already waiting when the consumer asks for the next one come out
    merged: a client (or an event loop) that falls behind gets fewer, larger chunks instead of a
    growing backlog of one-token chunks, each of which costs the event loop a full serialisation.
    """

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self._queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self._held: Delta | BaseException | None = None  # taken from the queue, not mergeable: next out
        self._open = len(request_ids)

    @property
    def finished(self) -> bool:
        return self._open == 0

    def _put(self, item: Delta | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self._open == 0:
            raise StopAsyncIteration
        if self._held is not None:
            item, self._held = self._held, None
        else:
            item = await self._queue.get()
        while isinstance(item, Delta) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, Delta) and later.index == item.index:
                item = item.then(later)
            else:
                self._held = later
                break
        if isinstance(item, BaseException):
            self._open = 0
            raise item
        if item.finished:
            self._open -= 1
        return item
