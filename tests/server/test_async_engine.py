"""The asyncio front in-process (no HTTP): deltas add up to the offline output, engine validation
errors reach the caller with nothing queued, aborts free slots, and a failing engine fails its
streams instead of hanging them."""

from __future__ import annotations

import asyncio

import pytest

from fast_xlstm import LLM, SamplingParams
from fast_xlstm.server import async_engine
from fast_xlstm.server.async_engine import AsyncEngine
from fast_xlstm.server.stream import Delta, EngineDeadError, RequestStream, SubRequest

from streamutil import streamed_deltas


@pytest.fixture(params=[False, True], ids=["sync", "async-scheduling"])
def llm(request) -> LLM:
    # (mixed steps, where one step can report two tokens of a request, are tested the same way in
    # tests/ops/triton/test_mixed_engine.py: they need the Triton kernels)
    return LLM("xlstm-tiny", device="cpu", max_num_seqs=2, async_scheduling=request.param)


def _run(coro):
    return asyncio.run(coro)


def test_deltas_add_up_to_the_offline_output(llm):
    prompts = [llm.tokenizer.encode(t) for t in ("Once upon a time", "The river", "A")]
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=2) for n in (9, 4, 7)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    texts, ids, lps, state = streamed_deltas(llm, prompts, params)  # 3 requests on 2 slots
    assert texts == [e.text for e in expected] and ids == [e.token_ids for e in expected]
    assert lps == [pytest.approx(e.logprobs, abs=1e-5) for e in expected]
    assert state == {"running": 0, "waiting": 0, "free_slots": 2, "slots": 2, "tracked": 0}


def test_engine_errors_reach_the_caller_and_aborts_free_slots(llm):
    async def main():
        front = AsyncEngine(llm.engine)
        front.start()
        good = SubRequest([0, 5, 6], SamplingParams(max_tokens=10_000, ignore_eos=True))
        with pytest.raises(ValueError, match="outside"):  # all or nothing: the good one is not kept
            await front.submit([good, SubRequest([0, 10**6], SamplingParams())])
        assert front.engine_state()["tracked"] == 0
        stream = await front.submit([good, good])
        first = await stream.__anext__()
        front.abort(stream)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if front.engine_state()["free_slots"] == 2:
                break
        state = front.engine_state()
        await front.stop()
        return first, state

    first, state = _run(main())
    assert len(first.token_ids) == 1 and not first.finished
    assert state == {"running": 0, "waiting": 0, "free_slots": 2, "slots": 2, "tracked": 0}


def test_a_submission_is_answered_once_its_first_step_is_on_the_device(llm, monkeypatch):
    """The answer (which sets off the route's response work in the event loop) waits until the
    engine has queued the prefill of the request's first token, so that work overlaps the device
    instead of competing with the launch. Scheduling is slowed so an early answer would show."""
    import threading
    import time

    engine = llm.engine
    prefill_started = threading.Event()
    schedule, prefill = engine.scheduler.schedule, engine.runner.prefill

    def slow_schedule():
        time.sleep(0.1)
        return schedule()

    def flagged_prefill(*args, **kwargs):
        prefill_started.set()
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine.scheduler, "schedule", slow_schedule)
    monkeypatch.setattr(engine.runner, "prefill", flagged_prefill)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def main():
        front = AsyncEngine(engine)
        front.start()
        stream = await front.submit([SubRequest([0, 5, 6, 7], params)])
        answered_after_launch = prefill_started.is_set()
        ids = [t async for d in stream for t in d.token_ids]
        # An add and an abort applied in one batch: no step runs, and the submission is still answered.
        take, gate = front._next_commands, threading.Event()

        def gated():
            front._next_commands = take  # once
            cmds = take()  # the add
            gate.wait()
            return cmds + take()  # the add is not applied yet, so this waits for the next command

        front._next_commands = gated
        task = asyncio.ensure_future(front.submit([SubRequest([0, 5], params)], request_id="gone"))
        await asyncio.sleep(0.05)
        front._commands.put(async_engine._Abort(["gone"]))
        gate.set()
        late = await asyncio.wait_for(task, 5)
        await front.stop()
        return answered_after_launch, ids, late

    answered_after_launch, ids, late = _run(main())
    assert answered_after_launch
    assert ids == llm.generate([[0, 5, 6, 7]], params, use_tqdm=False)[0].token_ids
    assert late.request_ids == ["gone"]


def test_a_failing_engine_fails_its_streams(llm, monkeypatch):
    def broken_step():
        raise RuntimeError("device lost")

    async def main():
        front = AsyncEngine(llm.engine)
        front.start()
        monkeypatch.setattr(llm.engine, "step", broken_step)
        stream = await front.submit([SubRequest([0, 5], SamplingParams(max_tokens=5))])
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in stream:
                pass
        assert not front.alive
        with pytest.raises(EngineDeadError):
            await front.submit([SubRequest([0, 5], SamplingParams(max_tokens=5))])
        await front.stop()

    _run(main())


def _delta(index, text, tok, lp=None, finish=None, n=1):
    return Delta(index=index, text=text, token_ids=[tok], logprobs=None if lp is None else [lp],
                 top_logprobs=None if lp is None else [{tok: lp}], finish_reason=finish, stop_reason=None,
                 prompt_tokens=3, cached_tokens=0, num_generated=n)


def test_waiting_deltas_of_a_choice_come_out_merged():
    async def main():
        stream = RequestStream(["a", "a:1"])
        for d in (_delta(0, "He", 1, -0.5, n=1), _delta(0, "llo", 2, -0.25, n=2), _delta(1, "x", 7, n=1),
                  _delta(1, "y", 8, n=2, finish="length"), _delta(1, "z", 9, n=3), _delta(0, "!", 3, -1.0, n=3)):
            stream._put(d)
        first = await stream.__anext__()  # two deltas of choice 0, stops at choice 1's
        second = await stream.__anext__()  # choice 1 up to its finished delta, not past it
        third = await stream.__anext__()
        stream._put(_delta(0, "?", 4, -2.0, n=4, finish="stop"))
        stream._put(EngineDeadError("gone"))
        fourth = await stream.__anext__()
        return first, second, third, fourth

    first, second, third, fourth = _run(main())
    assert (first.index, first.text, first.token_ids, first.logprobs, first.num_generated) == \
        (0, "Hello", [1, 2], [-0.5, -0.25], 2)
    assert first.top_logprobs == [{1: -0.5}, {2: -0.25}] and not first.finished
    assert (second.index, second.text, second.token_ids, second.finish_reason, second.logprobs) == \
        (1, "xy", [7, 8], "length", None)
    assert (third.index, third.text) == (1, "z")  # (a delta past a finish only happens in this test)
    assert (fourth.text, fourth.token_ids, fourth.finish_reason) == ("!?", [3, 4], "stop")


def test_an_error_after_deltas_still_ends_the_stream():
    async def main():
        stream = RequestStream(["a"])
        stream._put(_delta(0, "a", 1))
        stream._put(EngineDeadError("engine failed"))
        got = [await stream.__anext__()]
        with pytest.raises(EngineDeadError):
            await stream.__anext__()
        return got

    assert _run(main())[0].text == "a"
