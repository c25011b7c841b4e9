"""An asyncio front of `LLMEngine`: one background thread owns the engine; requests stream back.

The engine is not thread-safe and its `step()` blocks (it runs the model), so exactly one thread
ever touches it: it applies queued commands (add, abort, stop) between steps, steps while anything
is unfinished and sleeps on the command queue when idle. Each step's outputs are snapshotted in
that thread (the engine keeps mutating its own output objects) and handed to the event loop in one
`call_soon_threadsafe`, which puts them on per-request asyncio queues.

An accepted submission is answered only once the engine has queued the next step's device work
(`LLMEngine.on_launched`): the event loop's per-request work that the answer sets off (the route's
response, the stream's start) then runs while the device computes, instead of holding the GIL
while the engine thread prepares the launch of the request's first token.

`n > 1` and lists of prompts are several engine requests behind one `RequestStream`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..engine import LLMEngine, RequestOutput
from .metrics import ServerMetrics
from .stream import Delta, EngineDeadError, RequestStream, SubRequest

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one engine request (timings for the metrics)."""

    stream: RequestStream
    index: int
    arrival: float
    last_token: float | None = None
    prompt_counted: bool = False


@dataclass
class _Add:
    stream: RequestStream
    subrequests: list[SubRequest]
    arrival: float
    done: Future = field(default_factory=Future)


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


class AsyncEngine:
    """Runs `engine` in a background thread; `submit` requests and iterate their `RequestStream`."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop] = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None  # why the engine thread died, if it did
        self._aborted_at_stop = 0
        self._accepted: list[Future] = []  # engine thread only: submissions added, not yet answered
        engine.on_launched = self._answer_accepted
        if metrics is not None:
            metrics.bind_engine_state(self.engine_state, lambda: self.engine.stats)

    # ---- lifecycle (event loop side) ----------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread; call from the event loop that will consume the streams."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fast-xlstm-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 30.0) -> int:
        """Aborts everything still running and joins the engine thread; returns how many engine
        requests were aborted."""
        if self._thread is None:
            return 0
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)
        self._thread = None
        return self._aborted_at_stop

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def engine_state(self) -> dict[str, int]:
        """Sizes of the queues (reads lengths only, so any thread may call it)."""
        sched = self.engine.scheduler
        return {"running": len(sched.running), "waiting": len(sched.waiting), "free_slots": sched.num_free_slots,
                "slots": sched.num_slots, "tracked": len(self._tracked)}

    # ---- requests (event loop side) -------------------------------------------------------------
    async def submit(self, subrequests: list[SubRequest], request_id: str | None = None,
                     arrival: float | None = None) -> RequestStream:
        """Queues the engine requests of one API request; returns when the engine has accepted them.

        Raises ValueError (the engine's own validation; nothing was queued) or EngineDeadError.
        """
        if not self.alive:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        base = request_id or f"req-{next(self._ids)}"
        # Choice i > 0 is named like the engine names forked completions, so a fork needs no mapping.
        stream = RequestStream([base] + [f"{base}:{i}" for i in range(1, len(subrequests))])
        cmd = _Add(stream, subrequests, time.monotonic() if arrival is None else arrival)
        self._commands.put(cmd)
        try:
            await asyncio.wrap_future(cmd.done)
        except asyncio.CancelledError:
            # The client went away while the engine thread was adding: undo it (queued after the
            # add, so the engine thread sees the abort after the requests exist).
            self._commands.put(_Abort(stream.request_ids))
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stops a stream's unfinished engine requests and frees their slots. Never blocks, so it is
        safe in a `finally` of a cancelled task (a client that went away)."""
        if not stream.finished:
            self._commands.put(_Abort(stream.request_ids))

    # ---- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self.engine.model.device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(self.engine.model.device)
        try:
            while self._apply(self._next_commands()):
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
                self._answer_accepted()  # (no step ran: e.g. aborted in the same batch of commands)
        except BaseException as exc:  # a broken engine fails every request rather than hanging them
            logger.exception("engine thread failed")
            self.error = exc
            self._answer_accepted()  # their streams get the failure
            self._fail_all(EngineDeadError(f"engine failed: {exc!r}"))
        else:
            self._answer_accepted()
            self._fail_all(EngineDeadError("the server is shutting down"))
        self._refuse_pending()

    def _next_commands(self) -> list[_Add | _Abort | _Stop]:
        """Blocks for a command when the engine is idle; otherwise takes whatever is queued."""
        cmds = []
        if not self.engine.has_unfinished_requests():
            cmds.append(self._commands.get())
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _apply(self, cmds: list[_Add | _Abort | _Stop]) -> bool:
        """Applies commands in order; False once a stop came (later submissions are refused)."""
        stopping = False
        for cmd in cmds:
            if isinstance(cmd, _Stop):
                stopping = True
            elif isinstance(cmd, _Abort):
                for rid in cmd.request_ids:
                    if self._tracked.pop(rid, None) is not None:
                        self.engine.abort(rid)
                        if self.metrics is not None:
                            self.metrics.observe_finished("abort", None)
            elif stopping:
                _refuse(cmd, EngineDeadError("the server is shutting down"))
            else:
                self._add(cmd)
        return not stopping

    def _add(self, cmd: _Add) -> None:
        if not cmd.done.set_running_or_notify_cancel():  # the submitter gave up before we got here
            return
        added: list[str] = []
        subs, rids = cmd.subrequests, cmd.stream.request_ids
        try:
            if _forkable(subs):  # n choices of one prompt: prefill once, fork the state
                self.engine.add_request(subs[0].prompt_ids, subs[0].params, request_id=rids[0],
                                        session_id=subs[0].session_id, n=len(subs))
                added.append(rids[0])
                for index, rid in enumerate(rids):
                    self._tracked[rid] = _Tracked(cmd.stream, index, cmd.arrival)
                self._accepted.append(cmd.done)
                return
            for index, (rid, sub) in enumerate(zip(rids, subs)):
                self.engine.add_request(sub.prompt_ids, sub.params, request_id=rid, session_id=sub.session_id)
                added.append(rid)
                self._tracked[rid] = _Tracked(cmd.stream, index, cmd.arrival)
        except Exception as exc:  # all or nothing: undo the part that was queued
            for rid in added:
                self.engine.abort(rid)
                self._tracked.pop(rid, None)
            cmd.done.set_exception(exc)
            return
        self._accepted.append(cmd.done)

    def _answer_accepted(self) -> None:
        """Answers the submissions added since the last call (the engine's `on_launched`)."""
        accepted, self._accepted = self._accepted, []
        for done in accepted:
            done.set_result(None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        batch: list[tuple[RequestStream, Delta]] = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:  # aborted while it was in this step
                continue
            delta = self._snapshot(tracked.index, out)
            self._observe(tracked, delta, now)
            if delta.finished:
                del self._tracked[out.request_id]
            batch.append((tracked.stream, delta))
        if batch:
            self._loop.call_soon_threadsafe(_deliver, batch)

    @staticmethod
    def _snapshot(index: int, out: RequestOutput) -> Delta:
        o, k = out.output, len(out.new_token_ids)
        return Delta(index=index, text=out.new_text, token_ids=list(out.new_token_ids),
                     logprobs=None if o.logprobs is None else list(o.logprobs[-k:]),
                     top_logprobs=None if o.top_logprobs is None else [dict(t) for t in o.top_logprobs[-k:]],
                     finish_reason=o.finish_reason if out.finished else None,
                     stop_reason=o.stop_reason if out.finished else None,
                     prompt_tokens=len(out.prompt_token_ids), cached_tokens=out.num_cached_tokens,
                     num_generated=len(o.token_ids))

    def _observe(self, tracked: _Tracked, delta: Delta, now: float) -> None:
        m = self.metrics
        if m is None:
            return
        if not tracked.prompt_counted:
            tracked.prompt_counted = True
            m.observe_first_token(now - tracked.arrival, delta.prompt_tokens, delta.cached_tokens)
        elif tracked.last_token is not None:
            m.observe_inter_token(now - tracked.last_token)
        tracked.last_token = now
        m.observe_generated(len(delta.token_ids))
        if delta.finished:
            m.observe_finished(delta.finish_reason, now - tracked.arrival)

    def _fail_all(self, exc: BaseException) -> None:
        self._aborted_at_stop = len(self._tracked)
        streams = {id(t.stream): t.stream for t in self._tracked.values()}
        for rid in list(self._tracked):
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be what broke; the streams must still end
                logger.debug("abort of %s failed", rid, exc_info=True)
        self._tracked.clear()
        if streams and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_fail, list(streams.values()), exc)

    def _refuse_pending(self) -> None:
        """Answers submissions queued behind a stop or a failure instead of leaving them waiting."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                why = "the server is shutting down" if self.error is None else f"engine failed: {self.error!r}"
                _refuse(cmd, EngineDeadError(why))


def _refuse(cmd: _Add, exc: BaseException) -> None:
    if cmd.done.set_running_or_notify_cancel():
        cmd.done.set_exception(exc)


def _deliver(batch: list[tuple[RequestStream, Delta]]) -> None:
    for stream, delta in batch:
        stream._put(delta)


def _fail(streams: list[RequestStream], exc: BaseException) -> None:
    for stream in streams:
        stream._put(exc)


def _forkable(subs: list[SubRequest]) -> bool:
    """Several choices of one prompt whose parameters differ only in the seed the engine would give
    a forked completion (`seed + i`, or no seed at all)."""
    if len(subs) < 2:
        return False
    first = subs[0]
    for i, sub in enumerate(subs[1:], 1):
        want_seed = None if first.params.seed is None else first.params.seed + i
        if (sub.prompt_ids != first.prompt_ids or sub.params.seed != want_seed
                or dataclasses.replace(sub.params, seed=first.params.seed) != first.params):
            return False
    return True
