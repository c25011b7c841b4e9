"""A client that goes away mid-stream frees its slot at once; after 1,000 aborted streams nothing
leaks: no running or waiting request, every state slot free, nothing tracked by the front."""

from __future__ import annotations

import asyncio
import time

import httpx


def _idle(server) -> dict[str, float]:
    """Waits (bounded) for the engine to drain; returns the queue gauges."""
    keys = ("running", "waiting", "tracked")
    deadline = time.monotonic() + 30
    while True:
        m = server.metrics()
        gauges = {k: m[f"fast_xlstm_num_requests_{k}"] for k in keys}
        gauges["free_slots"] = m["fast_xlstm_num_free_state_slots"]
        if not any(gauges[k] for k in keys) or time.monotonic() > deadline:
            return gauges
        time.sleep(0.1)


def test_1000_aborted_streams_leak_nothing(server, async_client_factory):
    before = server.metrics().get('fast_xlstm_requests_finished_total{finish_reason="abort"}', 0)
    n, concurrency = 1000, 32

    async def one(client, i: int, sem: asyncio.Semaphore) -> None:
        async with sem:
            if i % 2:
                stream = await client.completions.create(model="xlstm-tiny", prompt=f"Go on {i}", max_tokens=4000,
                                                         temperature=0, stream=True, extra_body={"ignore_eos": True})
            else:
                stream = await client.chat.completions.create(
                    model="xlstm-tiny", messages=[{"role": "user", "content": f"Go on {i}"}], max_tokens=4000,
                    stream=True, extra_body={"ignore_eos": True})
            async for _ in stream:  # read one chunk, then hang up
                break
            await stream.close()

    async def main():
        sem = asyncio.Semaphore(concurrency)
        async with async_client_factory() as client:
            await asyncio.gather(*[one(client, i, sem) for i in range(n)])

    asyncio.run(main())
    gauges = _idle(server)
    assert gauges == {"running": 0, "waiting": 0, "tracked": 0, "free_slots": server.slots}
    after = server.metrics()['fast_xlstm_requests_finished_total{finish_reason="abort"}']
    assert after - before == n  # each was aborted, none ran to its 4,000 tokens


def test_disconnect_of_a_non_streaming_request_frees_its_slot(server):
    body = {"model": "xlstm-tiny", "prompt": "Long", "max_tokens": 4000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    try:
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=1.0)
    except httpx.ReadTimeout:
        pass  # the client gave up and closed the connection
    gauges = _idle(server)
    assert gauges == {"running": 0, "waiting": 0, "tracked": 0, "free_slots": server.slots}
