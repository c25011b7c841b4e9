"""Helpers shared by tests of the asyncio front: run requests through `AsyncEngine` and add up their deltas."""

from __future__ import annotations

import asyncio

from fast_xlstm import LLM, SamplingParams
from fast_xlstm.server.async_engine import AsyncEngine
from fast_xlstm.server.stream import SubRequest


def streamed_deltas(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
                    ) -> tuple[list[str], list[list[int]], list[list[float]], dict]:
    """Submits the prompts as one multi-request stream to a fresh front over `llm.engine`; returns per
    request the deltas' text, token ids and logprobs added up, and the engine state after the stream."""

    async def main():
        front = AsyncEngine(llm.engine)
        front.start()
        stream = await front.submit([SubRequest(p, sp) for p, sp in zip(prompts, params)])
        texts, ids, lps = [""] * len(prompts), [[] for _ in prompts], [[] for _ in prompts]
        async for d in stream:
            texts[d.index] += d.text
            ids[d.index] += d.token_ids
            lps[d.index] += d.logprobs
        state = front.engine_state()
        await front.stop()
        return texts, ids, lps, state

    return asyncio.run(main())
