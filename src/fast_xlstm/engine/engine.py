"""The engine loop: take requests, ask the scheduler what to run, run it, report what came out."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..generation.generate import encode_prompts
from ..generation.params import SamplingParams
from ..generation.tracker import GenerationOutput, RequestTracker, stop_token_ids
from ..model import ModelState, XLSTMForCausalLM
from ..tokenizer import Tokenizer
from .request import Request, RequestStatus
from .runner import DecodeMode, ModelRunner, PendingDecode, StepResult
from .scheduler import PrefillChunk, Scheduler, SchedulerOutput, trickle_min_decode
from .state_cache import Session, StateCache, prefix_keys


class _GcClock:
    """Cumulative seconds this process has spent in the cyclic garbage collector (`gc.callbacks`);
    the step log records each step's share, so a slow step can be told from a collection."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


_GC_CLOCK: _GcClock | None = None


def gc_clock() -> _GcClock:
    """The process's one `_GcClock`, registered on first use."""
    global _GC_CLOCK
    if _GC_CLOCK is None:
        _GC_CLOCK = _GcClock()
        gc.callbacks.append(_GC_CLOCK)
    return _GC_CLOCK


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new text and tokens since the last
    report, and the whole output so far (`output`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    new_text: str
    new_token_ids: list[int]
    output: GenerationOutput
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache or a session, not prefilled
    index: int = 0  # which of the request's n completions (request id of completion i > 0: f"{id}:{i}")


@dataclass
class _Launched:
    """A step on the device whose tokens the host has not read yet: the decoding requests (the first
    result rows) and, for a mixed step, the requests whose prompts it finishes (the rows after)."""
    decode: list[Request]
    done: list[Request]
    pending: PendingDecode
    mixed: bool = False

    @property
    def requests(self) -> list[Request]:
        return self.decode + self.done


class LLMEngine:
    """Continuous batching over a state-slot pool.

    `add_request` queues; each `step()` admits requests into free slots, runs one chunk of prefill
    (bounded by `max_num_batched_tokens`) and one decode token for every running request, and
    returns the requests that produced something. `abort` frees a slot at once.

    Prefix cache: prompt states are snapshotted every `prefix_block` tokens, keyed by the token
    prefix; a request whose prompt starts with a cached prefix starts from the longest one.
    Sessions: a finished request with a `session_id` leaves its state behind; the session's next
    request prefills only what its prompt adds. Both are bounded LRUs (device, then host memory),
    and a miss only means a longer prefill with the same result.
    """

    def __init__(self, model: XLSTMForCausalLM, tokenizer: Tokenizer | None, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, state_dtype: torch.dtype = torch.float32,
                 use_cuda_graph: bool | None = None, compile_decode: bool = False, compile_prefill: bool = False,
                 max_graph_prefill_tokens: int = 2048, enable_prefix_cache: bool = True, prefix_block: int = 512,
                 cache_device_bytes: int = 4 << 30, cache_host_bytes: int = 16 << 30,
                 max_sessions_device_bytes: int = 4 << 30, max_sessions_host_bytes: int = 16 << 30,
                 step_log: str | Path | None = None, async_scheduling: bool = False, mixed_steps: bool = False,
                 trickle_tokens: int = 0, trickle_backlog: int | None = None, trickle_max_decode: int | None = None,
                 batch1_compile_mode: str | None = "auto"):
        """step_log: a file that gets one JSON line per step (wall time, milliseconds, decode rows,
        prefill sequences and tokens, requests admitted, running and waiting, and the milliseconds
        the process spent in garbage collection since the previous line): how a load unfolds.

        async_scheduling: each step launches its decode before reading the previous step's tokens,
        so the host's per-token work (detokenizing, stop checks, streaming) overlaps the device's
        next step instead of leaving it idle. A request that finishes is seen one step late: the
        step already launched computes one token for it that is dropped.

        mixed_steps: a step with both prefill and decode runs them as one forward (`ModelRunner.can_mix`):
        a CUDA graph when the prefill fits a graph bucket, else the eager in-pool forward. The GEMMs
        read the weights once for both, the decoding requests take the decode step's kernel, fed
        their last sampled token on the device (so the step launches before the previous one is
        read), and the decode skips a step of its own. The tokens are the same as apart. With
        async scheduling a mixed step's tokens are read during the next step, like a decode step's
        (except where a finished prompt has forked siblings, which need its logits first).

        trickle_tokens: with mixed steps, 0 (off) or the most prompt tokens a step prefills while
        at least 16 requests decode (a quarter of the slots, if that is fewer) and little prompt
        is pending (`Scheduler`): a short piece in a many-row decode step's forward costs a
        fraction of its own prefill. trickle_backlog: how much pending prompt is "little" (None:
        4 * trickle_tokens); above it a step prefills a full pack. A large value trickles whole
        waves too, which spreads their requests' ends apart (see `Scheduler`). trickle_max_decode:
        no trickling above this many decoding requests (None: no bound), where a piece costs nearly
        what it costs in a pack.

        batch1_compile_mode: another compile mode for a compiled decode step of one request
        (`ModelRunner`; "auto": the same as larger batches).
        """
        self.model, self.tokenizer = model, tokenizer
        self.step_log = None if step_log is None else open(step_log, "a", buffering=1)
        self._gc_clock = gc_clock() if step_log is not None else None
        self._gc_logged = self._gc_clock.seconds if self._gc_clock is not None else 0.0
        self.async_scheduling = async_scheduling
        self.mixed_steps = mixed_steps
        self._inflight: _Launched | None = None  # launched, not yet read
        self.runner = ModelRunner(model, num_slots=max_num_seqs, state_dtype=state_dtype,
                                  use_cuda_graph=use_cuda_graph, compile_decode=compile_decode,
                                  compile_prefill=compile_prefill, max_graph_prefill_tokens=max_graph_prefill_tokens,
                                  batch1_compile_mode=batch1_compile_mode)
        self.prefix_block = prefix_block if enable_prefix_cache else 0
        self.prefix_cache: StateCache[bytes] | None = (
            StateCache(cache_device_bytes, cache_host_bytes) if enable_prefix_cache else None)
        self.sessions: StateCache[str] = StateCache(max_sessions_device_bytes, max_sessions_host_bytes)
        if trickle_tokens and not mixed_steps:
            raise ValueError("trickle_tokens needs mixed_steps: the pieces ride in decode steps' forwards")
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, block=self.prefix_block,
                                   on_admit=self._on_admit, trickle_tokens=trickle_tokens,
                                   trickle_min_decode=trickle_min_decode(max_num_seqs),
                                   trickle_backlog=trickle_backlog, trickle_max_decode=trickle_max_decode)
        self.requests: dict[str, Request] = {}
        self._stop_ids = stop_token_ids(model.config.stop_token_ids, tokenizer)
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0, "prefill_time": 0.0,
                      "decode_time": 0.0, "steps": 0, "step_time": 0.0, "mixed_steps": 0}
        # Called (from `step`) once the step's device work is queued, before the host waits for it,
        # and at the step's end: host work hung here (the server front's per-request setup) runs
        # while the device computes instead of delaying the launch.
        self.on_launched: Callable[[], None] | None = None

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, session_id: str | None = None, n: int = 1) -> str:
        """Queues a prompt (text or token ids); returns its request id.

        `session_id`: a conversation whose final state the engine keeps, so that a later request of
        the same session whose prompt extends this one's prompt + output prefills only the new tokens.
        `n`: completions of the prompt. The prompt is prefilled once and its state forked into n
        slots; completion i > 0 has request id f"{request_id}:{i}" and seed `params.seed + i`.
        """
        params = params or SamplingParams()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        ids = encode_prompts([prompt] if isinstance(prompt, str) else [list(prompt)], self.tokenizer,
                             self.model.config.vocab_size)[0]
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        all_ids = [rid] + [f"{rid}:{i}" for i in range(1, n)]
        if any(r in self.requests for r in all_ids):
            raise ValueError(f"request id {rid!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        reqs = []
        for i, r in enumerate(all_ids):
            p = params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            tracker = RequestTracker(ids, p, self.tokenizer, set() if p.ignore_eos else self._stop_ids)
            reqs.append(Request(r, ids, p, tracker, prompt=text, session_id=session_id if i == 0 else None,
                                index=i, parent=reqs[0] if i else None))
        reqs[0].children = reqs[1:]
        self.scheduler.add(reqs[0])
        self.requests.update({r.request_id: r for r in reqs})
        return rid

    def warm_up(self) -> float:
        """Compiles and captures what the first requests would otherwise wait for (decode graphs for
        greedy, greedy with logprobs and plain sampling; every graph-prefill bucket; the eager
        prefill's kernels). Call before adding requests; returns the seconds it took."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("warm_up needs an idle engine (it uses the first state slots)")
        t0 = time.perf_counter()
        greedy = DecodeMode(sample=False, filters=False, penalties=False, logprobs=False)
        self.runner.warm_up([greedy, dataclasses.replace(greedy, logprobs=True),
                             dataclasses.replace(greedy, sample=True)], mixed=self.mixed_steps,
                            mixed_tokens=self.scheduler.trickle_tokens or None)
        return time.perf_counter() - t0

    def abort(self, request_id: str) -> bool:
        """Stops a request (with its forked siblings) and frees its slots now; False if it is unknown
        or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None or req.finished:
            return False
        for r in [req, *req.children]:
            if not r.finished:
                self.requests.pop(r.request_id, None)
                self.scheduler.finish(r, RequestStatus.ABORTED)
                r.tracker.out.finish_reason = r.tracker.out.finish_reason or "abort"
        return True

    def has_unfinished_requests(self) -> bool:
        # (a launched step whose requests have all finished need not be read: nothing comes of it)
        return self.scheduler.has_unfinished() or (
            self._inflight is not None and not all(r.finished for r in self._inflight.requests))

    def get_session(self, session_id: str) -> Session | None:
        """What a session's kept state has consumed (None if unknown or evicted)."""
        meta = self.sessions.peek_meta(session_id)
        return meta if isinstance(meta, Session) else None

    def _on_admit(self, req: Request) -> None:
        """A request got a slot: load its sampling setup, then start it from the best cached state."""
        prompt = req.prompt_token_ids
        start: ModelState | None = None  # the cached state it starts from (None: the empty state)
        if req.parent is None:  # (a forked sibling gets its parent's prompt state once that is prefilled)
            if req.session_id is not None:
                session = self.get_session(req.session_id)
                n = len(session.tokens) if session else 0
                if session and n < len(prompt) and prompt[:n] == session.tokens:
                    start = self.sessions.get(req.session_id)[0]
                    req.num_prefilled = req.num_cached = n
            if self.prefix_cache is not None:
                req.prefix_keys = prefix_keys(prompt, self.prefix_block)
                for j in range(len(req.prefix_keys) - 1, -1, -1):
                    end = (j + 1) * self.prefix_block
                    if end <= req.num_prefilled:
                        break  # the session already got further
                    if end < len(prompt) and req.prefix_keys[j] in self.prefix_cache:
                        start = self.prefix_cache.get(req.prefix_keys[j])[0]
                        req.num_prefilled = req.num_cached = end
                        break
        # A restored slot is overwritten whole: emptying it first would be a wasted pass over 134 MB.
        self.runner.start_request(req.slot, prompt, req.params, req.tracker.seed, reset=start is None)
        if start is not None:
            self.runner.restore(req.slot, start)
        if req.parent is None:
            self.stats["cached_tokens"] += req.num_cached

    def step(self) -> list[RequestOutput]:
        t_step = time.perf_counter()
        sched = self.scheduler.schedule()
        try:
            outputs = self._run(sched)
        finally:
            self._launched()
        seconds = time.perf_counter() - t_step
        self.stats["steps"] += 1
        self.stats["step_time"] += seconds
        if self.step_log is not None:
            gc_seconds, self._gc_logged = self._gc_clock.seconds - self._gc_logged, self._gc_clock.seconds
            self.step_log.write(json.dumps({
                "time": time.time(), "ms": round(1e3 * seconds, 3), "decode": len(sched.decode),
                "prefill_seqs": len(sched.prefill), "prefill_tokens": sum(c.end - c.start for c in sched.prefill),
                "admitted": len(sched.newly_admitted), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "gc_ms": round(1e3 * gc_seconds, 3)}) + "\n")
        return outputs

    def _run(self, sched: SchedulerOutput) -> list[RequestOutput]:
        emitted: dict[str, RequestOutput] = {}
        if self.mixed_steps and sched.prefill and sched.decode and self.runner.can_mix(
                len(sched.decode), [c.end - c.start for c in sched.prefill]):
            self._mixed_step(sched, emitted)
            return list(emitted.values())
        # Decode first: the requests that were running before this step's prefill.
        if self.async_scheduling:
            self._decode_overlapped(sched.decode, emitted)
        elif sched.decode:
            t0 = time.perf_counter()
            self._launched()  # (the synchronous step launches and waits in one call)
            params = [r.params for r in sched.decode]
            result = self.runner.decode([r.slot for r in sched.decode], DecodeMode.of(params))
            self.stats["decode_time"] += time.perf_counter() - t0
            self._accept(sched.decode, result, emitted)
        if sched.prefill:
            t0 = time.perf_counter()
            chunks = sched.prefill
            result = self.runner.prefill([c.request.slot for c in chunks],
                                         [c.request.prompt_token_ids[c.start:c.end] for c in chunks],
                                         [c.is_last for c in chunks], [c.request.params for c in chunks],
                                         on_launched=self._launched)
            self.stats["prefill_time"] += time.perf_counter() - t0
            self._prefilled(chunks, result, emitted)
        return list(emitted.values())

    def _prefilled(self, chunks: list[PrefillChunk], result: StepResult, emitted: dict[str, RequestOutput]) -> None:
        """Bookkeeping after a prefill forward (`_prefill_launched`), then the first tokens of the
        prompts it finished (`result` rows, in chunk order)."""
        self._prefill_launched(chunks)
        self._first_tokens([c.request for c in chunks if c.is_last], result, emitted)

    def _prefill_launched(self, chunks: list[PrefillChunk]) -> None:
        """Progress and prefix snapshots of a launched prefill forward. The snapshots queue behind the
        forward on the device, so they hold its states whether or not its tokens were read yet."""
        for c in chunks:
            c.request.num_prefilled = c.end
            self.stats["prompt_tokens"] += c.end - c.start
            self._snapshot_prefix(c.request, c.end)

    def _first_tokens(self, done: list[Request], result: StepResult, emitted: dict[str, RequestOutput], *,
                      consumed_last: set[int] = frozenset()) -> None:
        """The first tokens of the prompts a prefill finished (`result` rows, in order), forked siblings
        first; rows of requests aborted since the launch are dropped."""
        now = time.monotonic()
        for r in done:
            r.first_token_time = now
        self._fork(done, result, emitted)  # before the parents' first tokens can finish them
        self._accept(done, result, emitted, skip_finished=True, consumed_last=consumed_last)

    def _mixed_step(self, sched: SchedulerOutput, emitted: dict[str, RequestOutput]) -> None:
        """Decode and prefill in one forward (`mixed_steps`): decoding requests first, as one-token
        pieces fed on the device. With async scheduling the previous step's tokens are read and
        reported while this forward runs, and this step's stay in flight until the next step has
        launched; without, or when a finished prompt has forked siblings (they start from its
        logits and prompt state), they are read at the step's end."""
        t0 = time.perf_counter()
        decode = self._launchable(sched.decode) if self.async_scheduling else sched.decode
        self.stats["mixed_steps"] += bool(decode)  # (none launchable: a plain prefill)
        chunks = sched.prefill
        pending = self.runner.prefill_launch(
            [r.slot for r in decode] + [c.request.slot for c in chunks],
            [None] * len(decode) + [c.request.prompt_token_ids[c.start:c.end] for c in chunks],
            [True] * len(decode) + [c.is_last for c in chunks],
            [r.params for r in decode] + [c.request.params for c in chunks])
        self._launched()
        self._prefill_launched(chunks)
        done = [c.request for c in chunks if c.is_last]
        launched = _Launched(decode, done, pending, mixed=True)
        previous, self._inflight = self._inflight, None
        if previous is not None:
            # This forward also feeds the tokens read here (see _decode_overlapped).
            self._collect(previous, emitted, consumed_last={id(r) for r in decode})
        if self.async_scheduling and not any(r.children for r in done):
            self._inflight = launched
        else:
            self._collect(launched, emitted)
        self.stats["prefill_time"] += time.perf_counter() - t0

    def _collect(self, step: _Launched, emitted: dict[str, RequestOutput], *,
                 consumed_last: set[int] = frozenset()) -> None:
        """Reads a launched step's tokens and hands them out. consumed_last: ids of requests in a step
        launched since, whose state will have consumed the token read here (see `_accept`)."""
        if not step.mixed:
            self._accept(step.decode, self.runner.decode_collect(step.pending), emitted, skip_finished=True,
                         consumed_last=consumed_last)
            return
        result = self.runner.prefill_collect(step.pending)
        n = len(step.decode)
        self._accept(step.decode, result.rows(0, n), emitted, skip_finished=True, consumed_last=consumed_last)
        self._first_tokens(step.done, result.rows(n, len(result.tokens)), emitted, consumed_last=consumed_last)

    def _decode_overlapped(self, reqs: list[Request], emitted: dict[str, RequestOutput]) -> None:
        """Launches this step's decode, then reads and reports the previous step's while it runs."""
        t0 = time.perf_counter()
        launched = None
        reqs = self._launchable(reqs)
        if reqs:
            mode = DecodeMode.of([r.params for r in reqs])
            launched = _Launched(reqs, [], self.runner.decode_launch([r.slot for r in reqs], mode))
            self._launched()
        previous, self._inflight = self._inflight, launched
        if previous is not None:
            # Requests in the step just launched will have fed their last sampled token to the state
            # by the time a snapshot (queued after that step) is taken.
            self._collect(previous, emitted, consumed_last={id(r) for r in reqs})
        self.stats["decode_time"] += time.perf_counter() - t0

    def _launchable(self, reqs: list[Request]) -> list[Request]:
        """The decoding requests worth launching with a step in flight. One that the step in flight
        brings to max_tokens is done: launching it again would compute a token only to drop it, and
        keep the device busy when the next request's prefill comes (the latency of sequential
        requests). Stops on EOS or stop strings stay one step late."""
        in_flight = {id(r) for r in self._inflight.requests} if self._inflight is not None else set()
        return [r for r in reqs if len(r.tracker.out.token_ids) + (id(r) in in_flight) < r.params.max_tokens]

    def _launched(self) -> None:
        if self.on_launched is not None:
            self.on_launched()

    def _fork(self, parents: list[Request], result: StepResult, emitted: dict[str, RequestOutput]) -> None:
        """Copies each parent's prompt state into its siblings' slots; each samples its first token
        from the parent's last-position logits with its own seed."""
        for row, parent in enumerate(parents):
            kids = [c for c in parent.children if not c.finished]
            if not kids:
                continue
            snapshot = self.runner.snapshot(parent.slot)
            for kid in kids:
                self.runner.restore(kid.slot, snapshot)
                kid.num_prefilled = len(kid.prompt_token_ids)
                kid.first_token_time = parent.first_token_time
            logits = result.logits[row:row + 1].expand(len(kids), -1)
            self._accept(kids, self.runner.sample_rows(logits, [k.slot for k in kids], [k.params for k in kids]),
                         emitted)

    def _snapshot_prefix(self, req: Request, end: int) -> None:
        # Only strictly inside the prompt: a state at the prompt's end is what sessions keep, and
        # caching every prompt's end state would copy 134 MB (7B, fp32) per request for nothing.
        if self.prefix_cache is None or end % self.prefix_block or end == 0 or end >= len(req.prompt_token_ids):
            return
        key = req.prefix_keys[end // self.prefix_block - 1]
        if key not in self.prefix_cache:
            self.prefix_cache.put(key, self.runner.snapshot(req.slot))

    def _accept(self, reqs: list[Request], result: StepResult, emitted: dict[str, RequestOutput], *,
                skip_finished: bool = False, consumed_last: set[int] = frozenset()) -> None:
        """Hands each request its sampled token. skip_finished: drop rows of requests that finished
        or were aborted since the step was launched; consumed_last: ids of requests whose state
        will also have consumed the token sampled here (an overlapped step is already running)."""
        for row, (req, tok) in enumerate(zip(reqs, result.tokens)):
            if skip_finished and req.finished:
                continue
            tr = req.tracker
            if result.logprobs is not None and req.params.logprobs is not None:
                tr.add_logprobs(result.logprobs[row], result.top_vals[row], result.top_ids[row])
            text = tr.accept(tok)
            self.stats["generation_tokens"] += 1
            finished = tr.out.finish_reason is not None
            if finished:
                if req.session_id is not None:  # the state has consumed the prompt and all but the last token
                    out = tr.out.token_ids if id(req) in consumed_last else tr.out.token_ids[:-1]
                    self.sessions.put(req.session_id, self.runner.snapshot(req.slot),
                                      Session(req.prompt_token_ids + out))
                self.scheduler.finish(req)
                self.requests.pop(req.request_id, None)
            prev = emitted.get(req.request_id)  # a mixed step reports two tokens: the step in flight's and its own
            emitted[req.request_id] = RequestOutput(
                req.request_id, req.prompt, req.prompt_token_ids, (prev.new_text if prev else "") + text,
                (prev.new_token_ids if prev else []) + [tok], tr.out, finished, req.num_cached, req.index)
