"""Decides, each step, which requests prefill which prompt pieces and which decode. No tensors.

Requests join free state slots at any step (continuous batching). Prefill is chunked and shares a
per-step token budget with decode (each decoding request costs one token), so long prompts never
stall the running streams for long. When all slots are taken, requests wait in FIFO order.

Trickle prefill (`trickle_tokens`): while many requests decode and little prompt is left to prefill,
a step prefills at most `trickle_tokens` prompt tokens. A decode step of many rows streams the
weights once for them all and leaves the tensor cores mostly idle, so a short prompt piece riding in
that forward (a mixed step) costs much less than its own prefill. A backlog (a wave of arrivals, or
prompts queued while decoding is light) still goes at the full budget: as one large pack it is
cheaper than many steps' worth of pieces, and its requests start decoding sooner. But requests
prefilled in one pack finish together, so closed-loop clients come back as a wave that packs again;
a `trickle_backlog` above a wave's size trickles the wave instead, which spreads the requests' ends
apart for good (worth it while the running set is small; for a wave of hundreds most slots would
wait for their piece while few decode). `trickle_max_decode` stops trickling above that many
decoding requests: a big decode batch's GEMMs already keep the tensor cores busy, so a piece rides at
nearly its full cost there, and a backlog waits longer for pieces than for one pack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .request import Request, RequestStatus


def trickle_min_decode(num_slots: int) -> int:
    """The fewest decoding requests with which a step trickles: 16, or a quarter of the slots if fewer."""
    return min(16, max(1, num_slots // 4))


@dataclass
class PrefillChunk:
    request: Request
    start: int  # prompt positions [start, end) run in this step
    end: int

    @property
    def is_last(self) -> bool:
        return self.end >= len(self.request.prompt_token_ids)


@dataclass
class SchedulerOutput:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)
    newly_admitted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Owns the queue, the running set and the slot numbers (0 .. num_slots-1)."""

    def __init__(self, num_slots: int, max_num_batched_tokens: int, *, block: int = 0,
                 on_admit: Callable[[Request], None] | None = None, trickle_tokens: int = 0,
                 trickle_min_decode: int = 16, trickle_backlog: int | None = None,
                 trickle_max_decode: int | None = None):
        """`block`: prefill chunks end on multiples of it where they can (prefix-cache snapshot points);
        `on_admit(request)`: called when a request gets its slot, before its first chunk is planned
        (the engine restores cached state there and advances `num_prefilled`).

        trickle_tokens: 0 (off) or the most prompt tokens a step prefills while at least
        `trickle_min_decode` (and at most `trickle_max_decode`, None: no bound) requests decode and the
        prompts admitted or waiting have at most `trickle_backlog` tokens left to prefill (default
        4 * trickle_tokens)."""
        if num_slots < 1 or max_num_batched_tokens < 1:
            raise ValueError("num_slots and max_num_batched_tokens must be >= 1")
        if trickle_tokens < 0 or trickle_min_decode < 1 or (trickle_backlog is not None and trickle_backlog < 0):
            raise ValueError("trickle_tokens and trickle_backlog must be >= 0 and trickle_min_decode >= 1")
        if trickle_max_decode is not None and trickle_max_decode < trickle_min_decode:
            raise ValueError(f"trickle_max_decode ({trickle_max_decode}) must be >= trickle_min_decode "
                             f"({trickle_min_decode})")
        self.num_slots = num_slots
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block = block
        self.on_admit = on_admit
        self.trickle_tokens = trickle_tokens
        self.trickle_min_decode = trickle_min_decode
        self.trickle_backlog = 4 * trickle_tokens if trickle_backlog is None else trickle_backlog
        self.trickle_max_decode = trickle_max_decode
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def add(self, request: Request) -> None:
        """Queues a request (and its forked siblings, which travel with it)."""
        if len(request.children) + 1 > self.num_slots:
            raise ValueError(f"n={len(request.children) + 1} completions need more than the {self.num_slots} slots")
        for req in [request, *request.children]:
            req.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        out.decode = [r for r in self.running if r.prefill_done]
        budget -= len(out.decode)
        if self.trickle_tokens and self._trickles(len(out.decode)) and self.prompt_backlog() <= self.trickle_backlog:
            budget = min(budget, self.trickle_tokens)
        # A request with forked siblings (n > 1) is admitted with all of them at once.
        while self.waiting and len(self._free_slots) > len(self.waiting[0].children):
            head = self.waiting.popleft()
            for req in [head, *head.children]:
                req.slot = self._free_slots.pop()
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.newly_admitted.append(req)
                if self.on_admit is not None:
                    self.on_admit(req)
        # Chunked prefill in admission order. The first chunk of a step always runs (at least one
        # token), so prompts progress even when decoding takes the whole budget.
        for req in self.running:
            if req.prefill_done or req.parent is not None:  # siblings get the parent's state instead
                continue
            if budget <= 0 and out.prefill:
                break
            start = req.num_prefilled
            end = start + min(len(req.prompt_token_ids) - start, max(budget, 1))
            if self.block:
                # End on a prefix-cache snapshot point: the last one inside a budget-limited chunk,
                # or, for the prompt's last chunk, the last one strictly inside the prompt (so
                # prompts that share a beginning find it cached); the tail runs in the next step.
                n, b = len(req.prompt_token_ids), self.block
                cut = (end // b) * b if end < n else ((n - 1) // b) * b
                if start < cut < end:
                    end = cut
            out.prefill.append(PrefillChunk(req, start, end))
            budget -= end - start
        return out

    def _trickles(self, decoding: int) -> bool:
        """Whether a step with this many decoding requests is in trickle's range."""
        return decoding >= self.trickle_min_decode and (
            self.trickle_max_decode is None or decoding <= self.trickle_max_decode)

    def prompt_backlog(self) -> int:
        """Prompt tokens still to prefill: running requests' unprefilled rest (from what is already
        restored or prefilled) and waiting requests' whole prompts (a cache hit may make it less)."""
        left = sum(len(r.prompt_token_ids) - r.num_prefilled for r in self.running
                   if r.parent is None and not r.prefill_done)
        return left + sum(len(r.prompt_token_ids) for r in self.waiting)

    def finish(self, request: Request, status: RequestStatus = RequestStatus.FINISHED) -> None:
        """Removes a running or waiting request and frees its slot at once."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            for child in request.children:  # still queued with their parent
                child.status = status
        if request.slot is not None:
            self._free_slots.append(request.slot)
            request.slot = None
        request.status = status
