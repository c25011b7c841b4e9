"""The scheduler alone (pure Python, no model): admission by slot, chunked prefill under a budget,
FIFO waiting, slots freed at once."""

from __future__ import annotations

import pytest

from fast_xlstm.engine.request import Request, RequestStatus
from fast_xlstm.engine.scheduler import Scheduler
from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.generation.tracker import RequestTracker


def req(name: str, n: int) -> Request:
    ids = list(range(1, n + 1))
    return Request(name, ids, SamplingParams(), RequestTracker(ids, SamplingParams(), None, set()))


def run_prefill(out):
    for c in out.prefill:
        c.request.num_prefilled = c.end


def test_admission_is_bounded_by_slots_and_fifo():
    s = Scheduler(num_slots=2, max_num_batched_tokens=100)
    a, b, c = req("a", 3), req("b", 3), req("c", 3)
    for r in (a, b, c):
        s.add(r)
    out = s.schedule()
    assert out.newly_admitted == [a, b] and c.status is RequestStatus.WAITING
    assert {a.slot, b.slot} == {0, 1}
    run_prefill(out)
    s.finish(a)
    assert a.slot is None and s.num_free_slots == 1
    out = s.schedule()
    assert out.newly_admitted == [c] and c.slot is not None and out.decode == [b]


def test_chunked_prefill_shares_the_budget_with_decode():
    s = Scheduler(num_slots=4, max_num_batched_tokens=10)
    long, short = req("long", 25), req("short", 4)
    s.add(long)
    out = s.schedule()
    assert [(c.start, c.end) for c in out.prefill] == [(0, 10)]
    run_prefill(out)
    s.add(short)
    out = s.schedule()
    assert [(c.request.request_id, c.start, c.end) for c in out.prefill] == [("long", 10, 20)]
    run_prefill(out)
    out = s.schedule()
    assert [(c.request.request_id, c.start, c.end) for c in out.prefill] == [("long", 20, 25), ("short", 0, 4)]
    assert out.prefill[0].is_last
    run_prefill(out)
    out = s.schedule()
    assert out.decode == [long, short] and not out.prefill


def test_prefill_never_starves_when_decode_fills_the_budget():
    s = Scheduler(num_slots=8, max_num_batched_tokens=2)
    running = [req(f"r{i}", 1) for i in range(3)]
    for r in running:
        s.add(r)
    out = s.schedule()
    while out.prefill:
        run_prefill(out)
        out = s.schedule()
    assert all(r.prefill_done for r in running)
    s.add(req("late", 5))
    out = s.schedule()
    # Decoding takes the whole budget, yet the waiting prompt still advances by a token.
    assert len(out.decode) == 3 and [(c.start, c.end) for c in out.prefill] == [(0, 1)]


def test_finish_waiting_request_and_bad_args():
    s = Scheduler(num_slots=1, max_num_batched_tokens=4)
    a, b = req("a", 2), req("b", 2)
    s.add(a), s.add(b)
    s.schedule()
    s.finish(b, RequestStatus.ABORTED)
    assert b.status is RequestStatus.ABORTED and not s.waiting
    with pytest.raises(ValueError):
        Scheduler(0, 4)


def test_chunks_stop_on_the_last_block_boundary():
    s = Scheduler(num_slots=2, max_num_batched_tokens=100, block=8)
    r = req("r", 20)
    s.add(r)
    out = s.schedule()
    assert [(c.start, c.end, c.is_last) for c in out.prefill] == [(0, 16, False)]
    run_prefill(out)
    out = s.schedule()
    assert [(c.start, c.end, c.is_last) for c in out.prefill] == [(16, 20, True)]
    run_prefill(out)
    exact = req("exact", 16)
    s.add(exact)
    out = s.schedule()
    # A prompt of exactly two blocks stops after the first: its end state is not a cache entry.
    assert [(c.request.request_id, c.start, c.end) for c in out.prefill] == [("exact", 0, 8)]
