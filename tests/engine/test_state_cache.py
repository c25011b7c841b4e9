"""Prefix state cache and sessions: identical outputs with and without them, fewer prefilled tokens,
bounded LRU with spill to host memory, and fallback to a full prefill after eviction."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm import LLM, SamplingParams
from fast_xlstm.engine.state_cache import StateCache, prefix_keys

from modelutil import drain

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def _state(value: float, nbytes_each: int = 64) -> list:
    t = torch.full((nbytes_each // 4,), value)
    return [(t.clone(), t.clone(), t.clone())]


def test_lru_spills_to_host_then_evicts():
    one = 3 * 64
    cache = StateCache(device_bytes=one, host_bytes=one)
    cache.put("a", _state(1.0), meta="A")
    cache.put("b", _state(2.0))  # a spills to host
    assert cache.used_bytes == {"device": one, "host": one} and cache.stats.spills == 1
    state, meta = cache.get("a")
    assert meta == "A" and state[0][0].device.type == "cpu" and float(state[0][0][0]) == 1.0
    cache.put("c", _state(3.0))  # b spills, the host tier drops its oldest entry
    assert "b" in cache and "c" in cache and len(cache) == 2 and cache.stats.evictions == 1
    assert cache.get("zzz") is None and cache.stats.misses == 1
    cache.pop("c")
    assert "c" not in cache and cache.used_bytes["device"] == 0


def test_prefix_keys_are_chained():
    a, b = list(range(20)), list(range(16)) + [99, 98, 97, 96]
    ka, kb = prefix_keys(a, 8), prefix_keys(b, 8)
    assert len(ka) == 2 and ka[0] == kb[0] and ka[1] == kb[1]
    assert prefix_keys([5] + a[1:], 8)[1] != ka[1]  # a change in block 0 changes every later key


@pytest.fixture(scope="module")
def models():
    kw = dict(device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64, prefix_block=8)
    return LLM("xlstm-tiny", **kw), LLM("xlstm-tiny", enable_prefix_cache=False, **kw)


def test_prefix_cache_gives_identical_outputs_with_fewer_prefilled_tokens(models):
    cached, plain = models
    system = "You are a careful assistant. Answer in one short sentence, please. " * 2
    prompts = [system + q for q in ("Why is the sky blue?", "What is 2+2?", "Name a river.", "Hi!", "Bye.")]
    before = dict(cached.engine.stats)
    a = cached.generate(prompts, GREEDY, use_tqdm=False)
    b = plain.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    prefilled = cached.engine.stats["prompt_tokens"] - before["prompt_tokens"]
    reused = cached.engine.stats["cached_tokens"] - before["cached_tokens"]
    total = sum(len(cached.tokenizer.encode(p)) for p in prompts)
    assert reused > 0 and prefilled + reused == total
    assert cached.engine.prefix_cache.stats.hits > 0


def test_session_resumes_and_matches_a_full_prefill(models):
    cached, plain = models
    eng = cached.engine
    first = cached.tokenizer.encode("User: tell me a story\nAssistant:")
    rid = eng.add_request(first, GREEDY, session_id="s1")
    out1 = drain(eng)[rid]
    turn2 = first + out1.output.token_ids + cached.tokenizer.encode("\nUser: and then?\nAssistant:", add_bos=False)
    session = eng.get_session("s1")
    assert session.tokens == first + out1.output.token_ids[:-1]
    rid2 = eng.add_request(turn2, GREEDY, session_id="s1")
    out2 = drain(eng)[rid2]
    assert out2.num_cached_tokens >= len(session.tokens)
    ref = plain.generate([turn2], GREEDY, use_tqdm=False)[0]
    assert out2.output.token_ids == ref.token_ids


@pytest.mark.parametrize("mixed_steps", [False, True], ids=["separate", "mixed-steps"])
def test_async_scheduling_sessions_and_prefix_cache_match_plain(models, mixed_steps):
    """With each decode launched before the previous one is read: a request that stops on a stop
    token is seen one step late, so its kept state has consumed that token too (the launched step
    fed it) and the session says so; one that reaches max_tokens is foreseen and not launched
    again, so its state stops before its last token, as in synchronous steps. Either way the next
    turn equals a full prefill, and prefix-cached outputs equal plain ones."""
    _, plain = models
    llm = LLM("xlstm-tiny", device="cpu", dtype="float32", max_num_seqs=4, max_num_batched_tokens=64,
              prefix_block=8, async_scheduling=True, mixed_steps=mixed_steps)
    eng = llm.engine
    first = llm.tokenizer.encode("User: tell me a story\nAssistant:")
    free_run = plain.generate([first], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].token_ids
    cut = next(j for j in range(3, 12) if free_run[j] not in free_run[:j])  # a token seen there first
    by_stop = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free_run[cut]])
    for sid, params, kept in (("s1", by_stop, cut + 1), ("s2", GREEDY, GREEDY.max_tokens - 1)):
        rid = eng.add_request(first, params, session_id=sid)
        other = eng.add_request(llm.tokenizer.encode("Another request, to keep the batch busy"),
                                SamplingParams(temperature=0, max_tokens=20))
        done = drain(eng)
        out1 = done[rid].output.token_ids
        assert len(done[other].output.token_ids) == 20
        assert eng.get_session(sid).tokens == first + out1[:kept], sid
        turn2 = first + out1 + llm.tokenizer.encode("\nUser: and then?\nAssistant:", add_bos=False)
        rid2 = eng.add_request(turn2, GREEDY, session_id=sid)
        out2 = drain(eng)[rid2]
        assert out2.num_cached_tokens == len(first) + kept, sid
        assert out2.output.token_ids == plain.generate([turn2], GREEDY, use_tqdm=False)[0].token_ids
    prompts = ["You are a careful assistant, answer briefly. " * 2 + q for q in ("Why?", "How?", "Who?")]
    assert [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == \
        [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    assert not eng.has_unfinished_requests()


def test_evicted_session_falls_back_to_full_prefill():
    llm = LLM("xlstm-tiny", device="cpu", dtype="float32", max_num_seqs=2, enable_prefix_cache=False,
              max_sessions_device_bytes=0, max_sessions_host_bytes=0)
    eng = llm.engine
    first = llm.tokenizer.encode("Hello there")
    rid = eng.add_request(first, GREEDY, session_id="s")
    out1 = drain(eng)[rid]
    assert eng.get_session("s") is None  # nothing fits a zero budget
    turn2 = first + out1.output.token_ids + [5, 6, 7]
    rid2 = eng.add_request(turn2, GREEDY, session_id="s")
    out2 = drain(eng)[rid2]
    assert out2.num_cached_tokens == 0
    assert out2.output.token_ids == llm.generate([turn2], GREEDY, use_tqdm=False)[0].token_ids


def test_snapshots_restored_from_the_host_tier():
    kw = dict(device="cpu", dtype="float32", max_num_seqs=2, max_num_batched_tokens=64, prefix_block=8)
    spilled = LLM("xlstm-tiny", cache_device_bytes=0, **kw)  # every snapshot lives in host memory
    plain = LLM("xlstm-tiny", enable_prefix_cache=False, **kw)
    prompts = ["A shared beginning for all of these prompts: " + q for q in ("one", "two", "three")]
    a = spilled.generate(prompts, GREEDY, use_tqdm=False)
    assert spilled.engine.prefix_cache.used_bytes["device"] == 0 and spilled.engine.prefix_cache.stats.hits > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
