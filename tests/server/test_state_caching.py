"""Prefix state cache and sessions through the HTTP API: identical outputs with and without them,
and fewer prefilled tokens, seen in `usage.prompt_tokens_details.cached_tokens` and `/metrics`."""

from __future__ import annotations

import openai
import pytest


def _client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)


def test_prefix_cache_and_sessions(start_server, ref):
    cached = start_server("--prefix-block", "16", "--max-num-batched-tokens", "64")
    plain = start_server("--no-prefix-cache")
    system = [0] + [(7 * i + 3) % 1000 + 5 for i in range(70)]  # a shared 71-token "system prompt"
    prompts = [system + [11 + j, 12 + j, 13 + j] for j in range(4)]
    kw = dict(model="xlstm-tiny", max_tokens=6, temperature=0)
    with _client(cached) as c, _client(plain) as p:
        first = c.completions.create(prompt=prompts[0], **kw)
        later = [c.completions.create(prompt=pr, **kw) for pr in prompts[1:]]
        base = [p.completions.create(prompt=pr, **kw) for pr in prompts]
        assert [r.choices[0].text for r in [first, *later]] == [r.choices[0].text for r in base]
        assert [r.choices[0].text for r in base] == [o.text for o in ref(prompts, max_tokens=6, temperature=0)]
        assert all(r.usage.prompt_tokens_details.cached_tokens == 64 for r in later)  # 4 blocks of 16
        assert all((r.usage.prompt_tokens_details.cached_tokens or 0) == 0 for r in base)

        # A session: turn 2 extends turn 1's prompt and output, and prefills only the new tokens.
        turn1 = [0, 40, 41, 42, 43]
        r1 = c.completions.create(prompt=turn1, extra_body={"session_id": "s1"}, **kw)
        out1 = r1.choices[0].text
        ids1 = ref([turn1], max_tokens=6, temperature=0)[0].token_ids
        assert out1 == ref([turn1], max_tokens=6, temperature=0)[0].text
        turn2 = turn1 + ids1 + [50, 51, 52]
        r2 = c.completions.create(prompt=turn2, extra_body={"session_id": "s1"}, **kw)
        assert r2.choices[0].text == p.completions.create(prompt=turn2, **kw).choices[0].text
        # (turn 1 ended on max_tokens: its last token was never fed, in either scheduling mode)
        assert r2.usage.prompt_tokens_details.cached_tokens == len(turn1) + len(ids1) - 1
    metrics = cached.metrics()
    hit = [v for k, v in metrics.items() if "prefix_cache_hit" in k or "cached" in k]
    assert hit and max(hit) > 0


@pytest.mark.parametrize("mode", ["--async-scheduling", "--no-async-scheduling"])
def test_scheduling_modes_stream_and_sessions_equal_offline(start_server, ref, mode):
    """A server that launches each decode before reading the previous one (the default), and one
    that steps synchronously: 24 concurrent streams on 6 slots equal their offline results, and a
    session's second turn still does."""
    import asyncio

    srv = start_server(mode, "--max-num-batched-tokens", "48", slots=6)
    prompts = [[0] + [(13 * i + 7 * j) % 900 + 5 for j in range(3 + i % 11)] for i in range(24)]
    lengths = [3 + i % 7 for i in range(24)]

    async def one(client, i):
        text = ""
        async for c in await client.completions.create(model="xlstm-tiny", prompt=prompts[i], max_tokens=lengths[i],
                                                        temperature=0, stream=True):
            text += c.choices[0].text
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*[one(client, i) for i in range(24)])

    texts = asyncio.run(main())
    assert texts == [ref([p], max_tokens=n, temperature=0)[0].text for p, n in zip(prompts, lengths)]
    kw = dict(model="xlstm-tiny", max_tokens=6, temperature=0)
    with _client(srv) as c:
        turn1 = [0, 40, 41, 42, 43]
        r1 = c.completions.create(prompt=turn1, extra_body={"session_id": "s"}, **kw)
        turn2 = turn1 + ref([turn1], **{k: v for k, v in kw.items() if k != "model"})[0].token_ids + [50, 51]
        r2 = c.completions.create(prompt=turn2, extra_body={"session_id": "s"}, **kw)
    assert r1.choices[0].text == ref([turn1], max_tokens=6, temperature=0)[0].text
    # Turn 1 ended on max_tokens, which async scheduling foresees: neither mode fed its last token.
    assert r2.usage.prompt_tokens_details.cached_tokens == len(turn2) - 3
    assert r2.choices[0].text == ref([turn2], max_tokens=6, temperature=0)[0].text
