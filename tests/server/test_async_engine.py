"""The asyncio front in-process (no HTTP): deltas add up to the offline output, engine validation
errors reach the caller with nothing queued, aborts free slots, and a failing engine fails its
streams instead of hanging them."""

from __future__ import annotations

import asyncio

import pytest

from fast_xlstm import LLM, SamplingParams
from fast_xlstm.server.async_engine import AsyncEngine
from fast_xlstm.server.stream import EngineDeadError, SubRequest


@pytest.fixture
def llm() -> LLM:
    return LLM("xlstm-tiny", device="cpu", max_num_seqs=2)


def _run(coro):
    return asyncio.run(coro)


def test_deltas_add_up_to_the_offline_output(llm):
    prompts = [llm.tokenizer.encode(t) for t in ("Once upon a time", "The river", "A")]
    params = SamplingParams(temperature=0, max_tokens=7, logprobs=2)
    expected = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        front = AsyncEngine(llm.engine)
        front.start()
        stream = await front.submit([SubRequest(p, params) for p in prompts])  # 3 requests on 2 slots
        texts, ids, lps = ["", "", ""], [[], [], []], [[], [], []]
        async for d in stream:
            texts[d.index] += d.text
            ids[d.index] += d.token_ids
            lps[d.index] += d.logprobs
        state = front.engine_state()
        await front.stop()
        return texts, ids, lps, state

    texts, ids, lps, state = _run(main())
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
