"""The real `openai` client against a real server: outputs equal offline `LLM.generate`, streamed
or not, sync and async, under queueing (8 slots) and chunked prefill; the SSE wire format; stop
strings, logprobs, seeds, `n`, sessions, usage and metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import torch

from fast_xlstm import SamplingParams

PROMPTS = ["Once upon a time", "The river", "A", "Über die Brücke ging 🐟 der Fisch, and then", "x y z",
           "hello there, how are you doing today?", "7"]


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == ["xlstm-tiny"]
    assert client.models.retrieve("xlstm-tiny").id == "xlstm-tiny"


def test_completions_equal_offline(client, ref):
    expected = ref(PROMPTS, temperature=0, max_tokens=12)
    for prompt, exp in zip(PROMPTS, expected):
        r = client.completions.create(model="xlstm-tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.id.startswith("cmpl-")
        assert r.choices[0].text == exp.text and r.choices[0].finish_reason == exp.finish_reason
        assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
        assert r.usage.completion_tokens == len(exp.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_completions_prompt_list_and_token_ids(client, ref):
    prompts = [[0, 5, 6, 7], [0, 100, 200]]
    expected = ref(prompts, temperature=0, max_tokens=6)
    r = client.completions.create(model="xlstm-tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [e.text for e in expected]
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == sum(len(e.token_ids) for e in expected)
    one = client.completions.create(model="xlstm-tiny", prompt=prompts[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == expected[0].text


def test_completion_stream_equals_offline(client, ref):
    [exp] = ref(PROMPTS[3:4], temperature=0, max_tokens=20)
    stream = client.completions.create(model="xlstm-tiny", prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == exp.text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [exp.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_equals_offline_default_format(client, offline, ref):
    # The documented default format: `[system\n\n]User: message\nAssistant:` after BOS.
    ids = offline.tokenizer.encode("Be terse.\n\nUser: Hi there\nAssistant:")
    [exp] = ref([ids], temperature=0, max_tokens=16)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model="xlstm-tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == exp.text and r.choices[0].finish_reason == exp.finish_reason
    assert r.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="xlstm-tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == exp.text
    assert chunks[-1].choices[0].finish_reason == exp.finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_sse_wire_format(server):
    """Byte-level: `data: {json}` events, a blank line after each, `data: [DONE]` last; usage on
    every chunk as null and in a final chunk with no choices; deltas carry only present fields."""
    body = {"model": "xlstm-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    for c in chunks[1:-2]:
        assert set(c["choices"][0]["delta"]) == {"content"}


def _64_streams_equal_offline(make_client, offline) -> None:
    """64 streams at once (the rest queue behind the server's slots): every one finishes and equals its
    offline result. Odd ones are chats (default format)."""
    texts = [f"Request number {i}: " + "word " * (i % 13) for i in range(64)]
    max_tokens = [4 + i % 9 for i in range(64)]
    prompts = [t if i % 2 == 0 else offline.tokenizer.encode(f"User: {t}\nAssistant:") for i, t in enumerate(texts)]
    expected = offline.generate(prompts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                                use_tqdm=False)

    async def one(client, i: int) -> tuple[str, str | None]:
        kw = dict(model="xlstm-tiny", max_tokens=max_tokens[i], temperature=0, stream=True)
        text, finish = "", None
        if i % 2 == 0:
            async for c in await client.completions.create(prompt=texts[i], **kw):
                text += c.choices[0].text
                finish = c.choices[0].finish_reason or finish
        else:
            async for c in await client.chat.completions.create(messages=[{"role": "user", "content": texts[i]}],
                                                                **kw):
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
        return text, finish

    async def main():
        async with make_client() as client:
            return await asyncio.gather(*[one(client, i) for i in range(64)])

    results = asyncio.run(main())
    for (text, finish), exp in zip(results, expected):
        assert text == exp.text and finish == exp.finish_reason


def test_64_concurrent_async_streams_equal_offline(async_client_factory, offline):
    """64 streams on 8 slots with a 64-token step budget."""
    _64_streams_equal_offline(async_client_factory, offline)


def test_64_concurrent_streams_with_mixed_steps(start_server, offline):
    """The same with `--mixed-steps`: decoding requests ride in the prefill forwards of the steps that
    also admit queued requests (with async scheduling one step can then report two tokens of a
    request); the server reports that such steps ran. Mixed steps need the Triton kernels: on CPU
    the server runs them in Triton's interpreter (warm-up off: it would capture every bucket)."""
    import openai

    pytest.importorskip("triton")
    srv = start_server("--mixed-steps", "--max-num-batched-tokens", "64", "--no-warmup", api_key="mixed-key",
                       slots=8, env={"TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None)
    _64_streams_equal_offline(lambda: openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key,
                                                         max_retries=0), offline)
    assert srv.metrics()["fast_xlstm_engine_mixed_steps"] > 0


def test_trickle_prefill_pieces_ride_in_decode_steps(start_server, offline, tmp_path):
    """`--trickle-tokens 8` (mixed steps implied): two streams decode, then a third request comes; with
    a quarter of the 8 slots decoding and its prompt within the 32-token backlog, the prompt goes in
    pieces of at most 8 tokens inside the decode steps' forwards (their tokens read one step late).
    All three equal their offline results, and the step log shows the pieces."""
    import json

    import openai

    pytest.importorskip("triton")
    log = tmp_path / "steps.jsonl"
    srv = start_server("--trickle-tokens", "8", "--no-warmup", "--step-log", str(log), api_key="trickle-key",
                       slots=8, env={"TRITON_INTERPRET": "1"} if not torch.cuda.is_available() else None)
    texts = ["Once upon a time", "The river ran", "A long prompt that arrives later: " + "word " * 4]
    late = offline.tokenizer.encode(texts[2])
    assert 8 < len(late) <= 32
    max_tokens = [40, 40, 6]
    expected = offline.generate(texts, [SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                                use_tqdm=False)

    async def stream(client, i: int, started: asyncio.Event | None = None) -> str:
        text = ""
        async for c in await client.completions.create(model="xlstm-tiny", prompt=texts[i], max_tokens=max_tokens[i],
                                                       temperature=0, stream=True):
            text += c.choices[0].text
            if started is not None and text:
                started.set()
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=srv.api_key, max_retries=0) as client:
            events = [asyncio.Event(), asyncio.Event()]
            first = [asyncio.create_task(stream(client, i, events[i])) for i in (0, 1)]
            for e in events:  # both decode before the third comes
                await e.wait()
            third = await stream(client, 2)
            return [*(await asyncio.gather(*first)), third]

    assert asyncio.run(main()) == [e.text for e in expected]
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    pieces = [s["prefill_tokens"] for s in steps if s["decode"] >= 2 and s["prefill_tokens"]]
    assert pieces and max(pieces) <= 8 and sum(pieces) >= len(late), steps
    assert srv.metrics()["fast_xlstm_engine_mixed_steps"] > 0


def test_async_chat_non_streaming(async_client_factory, offline, ref):
    ids = offline.tokenizer.encode("User: Tell me\nAssistant:")
    [exp] = ref([ids], temperature=0, max_tokens=10)

    async def main():
        async with async_client_factory() as client:
            return await client.chat.completions.create(
                model="xlstm-tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10, temperature=0)

    assert asyncio.run(main()).choices[0].message.content == exp.text


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings(client, ref, include):
    [exp] = ref(["Once upon a time"], temperature=0, max_tokens=40, stop=["e", "a"],
                include_stop_str_in_output=include)
    r = client.completions.create(model="xlstm-tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=["e", "a"], extra_body={"include_stop_str_in_output": include})
    assert r.choices[0].text == exp.text and r.choices[0].finish_reason == exp.finish_reason
    s = client.completions.create(model="xlstm-tiny", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=["e", "a"], stream=True, extra_body={"include_stop_str_in_output": include})
    assert "".join(c.choices[0].text for c in s) == exp.text


def test_completion_logprobs(client, ref):
    [exp] = ref(["The river"], temperature=0, max_tokens=6, logprobs=3)
    r = client.completions.create(model="xlstm-tiny", prompt="The river", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(exp.token_ids)
    assert lp.token_logprobs == pytest.approx(exp.logprobs, abs=1e-4)
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # decoded alternatives may coincide
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # Greedy: the chosen token is the best alternative.
    assert all(max(t.values()) == pytest.approx(v, abs=1e-5) for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    s = client.completions.create(model="xlstm-tiny", prompt="The river", max_tokens=6, temperature=0, logprobs=3,
                                  stream=True)
    streamed = [v for c in s if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(exp.logprobs, abs=1e-4)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="xlstm-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)
    plain = client.chat.completions.create(model="xlstm-tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_seed_and_n(client, ref):
    kw = dict(model="xlstm-tiny", prompt="The river", max_tokens=12, temperature=0.9)
    a = client.completions.create(**kw, seed=7)
    b = client.completions.create(**kw, seed=7)
    assert a.choices[0].text == b.choices[0].text
    # Choice i of a seeded request uses seed + i, so n seeded choices differ and are reproducible.
    exp = [ref(["The river"], temperature=0.9, max_tokens=12, seed=s)[0].text for s in (7, 8, 9)]
    r = client.completions.create(**kw, seed=7, n=3)
    assert [c.text for c in r.choices] == exp
    assert r.usage.prompt_tokens == len(ref(["The river"], temperature=0, max_tokens=1)[0].prompt_token_ids)
    s = client.completions.create(**kw, seed=7, n=3, stream=True)
    texts = ["", "", ""]
    for c in s:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == exp


def test_session_id_gives_the_same_output(client):
    """Sessions may only save prefill work: the outputs with and without `session_id` are equal."""
    turn1 = [{"role": "user", "content": "Hello"}]
    kw = dict(model="xlstm-tiny", max_tokens=8, temperature=0)
    plain1 = client.chat.completions.create(messages=turn1, **kw)
    sess1 = client.chat.completions.create(messages=turn1, extra_body={"session_id": "conv-1"}, **kw)
    assert sess1.choices[0].message.content == plain1.choices[0].message.content
    turn2 = turn1 + [{"role": "assistant", "content": plain1.choices[0].message.content},
                     {"role": "user", "content": "And then?"}]
    plain2 = client.chat.completions.create(messages=turn2, **kw)
    sess2 = client.chat.completions.create(messages=turn2, extra_body={"session_id": "conv-1"}, **kw)
    assert sess2.choices[0].message.content == plain2.choices[0].message.content
    assert sess2.usage.prompt_tokens == plain2.usage.prompt_tokens


def test_metrics_move(server, client):
    before = server.metrics()
    client.completions.create(model="xlstm-tiny", prompt="Count me", max_tokens=5, temperature=0)
    after = server.metrics()
    assert after["fast_xlstm_prompt_tokens_total"] > before["fast_xlstm_prompt_tokens_total"]
    assert after["fast_xlstm_generation_tokens_total"] == before["fast_xlstm_generation_tokens_total"] + 5
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"fast_xlstm_{h}_count"] == before[f"fast_xlstm_{h}_count"] + 1
    assert after["fast_xlstm_inter_token_latency_seconds_count"] == \
        before["fast_xlstm_inter_token_latency_seconds_count"] + 4
    assert after['fast_xlstm_requests_finished_total{finish_reason="length"}'] == \
        before.get('fast_xlstm_requests_finished_total{finish_reason="length"}', 0) + 1
    assert 0.0 <= after["fast_xlstm_prefix_cache_hit_rate"] <= 1.0
    assert after["fast_xlstm_num_state_slots"] == server.slots
    # The engine's own counters: at least one prefill step and 4 decode steps, and busy time that
    # splits into prefill and decode time.
    assert after["fast_xlstm_engine_steps"] >= before["fast_xlstm_engine_steps"] + 5
    busy = after["fast_xlstm_engine_step_seconds"] - before["fast_xlstm_engine_step_seconds"]
    parts = sum(after[f"fast_xlstm_engine_{k}_seconds"] - before[f"fast_xlstm_engine_{k}_seconds"]
                for k in ("prefill", "decode"))
    assert busy > 0 and 0 < parts <= busy
