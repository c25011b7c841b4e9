"""A request as the scheduler sees it: ids, status, its state slot and how far its prompt is prefilled."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..generation.params import SamplingParams
from ..generation.tracker import RequestTracker


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no slot
    RUNNING = "running"  # holds a slot; prefilling while num_prefilled < len(prompt), then decoding
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tracker: RequestTracker
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    slot: int | None = None
    num_prefilled: int = 0
    num_cached: int = 0  # prompt tokens restored from the prefix cache or the session
    session_id: str | None = None
    prefix_keys: list[bytes] = field(default_factory=list)  # chained hashes of prompt blocks
    first_token_time: float | None = None
    index: int = 0  # which of the n completions of one prompt this is
    parent: "Request | None" = None  # set on forked siblings: they start from the parent's prompt state
    children: list["Request"] = field(default_factory=list)

    @property
    def prefill_done(self) -> bool:
        return self.num_prefilled >= len(self.prompt_token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.tracker.out.token_ids)

    @property
    def finished(self) -> bool:
        return self.status in (RequestStatus.FINISHED, RequestStatus.ABORTED)
