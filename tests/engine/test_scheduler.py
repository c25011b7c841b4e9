"""The scheduler alone (pure Python, no model): admission by slot, chunked prefill under a budget,
FIFO waiting, slots freed at once."""

from __future__ import annotations

import pytest

from fast_xlstm.engine.request import Request, RequestStatus
from fast_xlstm.engine.scheduler import Scheduler, trickle_min_decode
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


def _decoding(s: Scheduler, n: int, length: int = 3) -> list[Request]:
    """n requests admitted and fully prefilled (decoding from the next step on)."""
    rs = [req(f"d{i}", length) for i in range(n)]
    for r in rs:
        s.add(r)
    run_prefill(s.schedule())
    assert all(r.prefill_done for r in rs)
    return rs


def test_trickle_caps_prefill_while_many_decode_and_little_waits():
    s = Scheduler(num_slots=8, max_num_batched_tokens=1000, trickle_tokens=5, trickle_min_decode=3)
    assert s.trickle_backlog == 20  # 4 pieces' worth by default
    dec = _decoding(s, 3)
    p = req("p", 18)
    s.add(p)
    assert s.prompt_backlog() == 18
    pieces = []
    while not p.prefill_done:
        out = s.schedule()
        assert out.decode == dec
        pieces.append(sum(c.end - c.start for c in out.prefill))
        run_prefill(out)
    assert pieces == [5, 5, 5, 3]


def test_trickle_gives_a_backlog_or_light_decoding_the_full_budget():
    s = Scheduler(num_slots=8, max_num_batched_tokens=1000, trickle_tokens=5, trickle_min_decode=3)
    _decoding(s, 3)
    big = [req("a", 15), req("b", 6)]  # 21 tokens pending > the 20-token backlog
    for r in big:
        s.add(r)
    out = s.schedule()
    assert [c.end - c.start for c in out.prefill] == [15, 6]  # one pack, as without trickle
    # Fewer decoding requests than trickle_min_decode: the full budget too.
    s2 = Scheduler(num_slots=8, max_num_batched_tokens=1000, trickle_tokens=5, trickle_min_decode=3)
    _decoding(s2, 2)
    q = req("q", 12)
    s2.add(q)
    assert [c.end - c.start for c in s2.schedule().prefill] == [12]
    # trickle_tokens=0 (the default) never caps.
    s3 = Scheduler(num_slots=8, max_num_batched_tokens=1000)
    _decoding(s3, 5)
    s3.add(r := req("r", 12))
    assert [c.end - c.start for c in s3.schedule().prefill] == [12] and r.slot is not None


def test_trickle_stops_above_trickle_max_decode():
    """With more decoding requests than trickle_max_decode a step takes the full budget (one pack);
    at exactly that many it still trickles."""
    for decoding, pieces in ((4, [5]), (5, [12])):
        s = Scheduler(num_slots=8, max_num_batched_tokens=1000, trickle_tokens=5, trickle_min_decode=3,
                      trickle_max_decode=4)
        _decoding(s, decoding)
        s.add(req("p", 12))
        assert [c.end - c.start for c in s.schedule().prefill] == pieces, decoding


def test_trickle_min_decode_is_16_or_a_quarter_of_the_slots():
    assert [trickle_min_decode(n) for n in (1, 3, 8, 64, 256)] == [1, 1, 2, 16, 16]


def test_prompt_backlog_counts_what_is_left_and_trickle_rejects_bad_args():
    s = Scheduler(num_slots=1, max_num_batched_tokens=4)
    a, b = req("a", 10), req("b", 7)
    s.add(a)
    s.add(b)
    run_prefill(s.schedule())  # a: 4 of 10 prefilled; b waits (one slot)
    assert a.num_prefilled == 4 and s.prompt_backlog() == 6 + 7
    for kw in ({"trickle_tokens": -1}, {"trickle_min_decode": 0}, {"trickle_backlog": -2},
               {"trickle_min_decode": 4, "trickle_max_decode": 3}):
        with pytest.raises(ValueError, match="trickle"):
            Scheduler(num_slots=1, max_num_batched_tokens=4, **kw)
