"""Mixed steps through the engine with the device-table kernels (Triton's interpreter on CPU, compiled
on CUDA): decoding requests ride in a prefill's forward (the decode step's kernel on their rows, the
chunkwise kernels on the prompt pieces, one set of GEMMs), and every output equals eager generation."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("triton")

from fast_xlstm import LLM, SamplingParams, generate

from modelutil import drain
from streamutil import streamed_deltas

PROMPTS = ["Once upon a time", "The river", "A", "hello there, how are you?", "x y z"]


@pytest.mark.parametrize("graph_prefill", [True, False], ids=["graph-buckets", "in-pool"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=8),
    SamplingParams(temperature=0.8, seed=4, max_tokens=6, repetition_penalty=1.2, logprobs=2),
], ids=["greedy", "sampled-penalised-logprobs"])
def test_mixed_steps_equal_eager_generate(device, async_scheduling, params, graph_prefill):
    # 3 slots for 5 prompts, 6-token step budget: prompts are prefilled in pieces while others decode.
    # Without graph buckets (max_graph_prefill_tokens=0) every mixed step is the eager in-pool forward,
    # the path of prompt packs too large for a bucket.
    llm = LLM("xlstm-tiny", device=device, dtype="float32", max_num_seqs=3, max_num_batched_tokens=6,
              mixed_steps=True, async_scheduling=async_scheduling,
              max_graph_prefill_tokens=2048 if graph_prefill else 0)
    assert llm.engine.runner.planned_prefill == graph_prefill and llm.engine.runner.prefill_in_pool
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    ref = generate(llm.model, llm.tokenizer, PROMPTS, params)
    assert llm.engine.stats["mixed_steps"] > 0
    if graph_prefill:
        assert any(key[0] for key in llm.engine.runner._planned), "no mixed-step layout ran"
    else:
        assert not llm.engine.runner._planned, "a graph bucket ran"
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids and o.finish_reason == r.finish_reason
        if params.logprobs is not None:
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_mixed_step_deltas_add_up_to_the_offline_output(device):
    """With async scheduling a mixed step reports two tokens of a request (the step in flight's and
    its own): the asyncio front's deltas must still add up to the offline output."""
    llm = LLM("xlstm-tiny", device=device, dtype="float32", max_num_seqs=2, async_scheduling=True, mixed_steps=True)
    prompts = [llm.tokenizer.encode(t) for t in ("Once upon a time", "The river", "A")]
    # Different lengths: the third request's prefill comes while the first still decodes (a mixed step).
    params = [SamplingParams(temperature=0, max_tokens=n, logprobs=2) for n in (9, 4, 7)]
    expected = llm.generate(prompts, params, use_tqdm=False)
    before = llm.engine.stats["mixed_steps"]
    texts, ids, lps, state = streamed_deltas(llm, prompts, params)  # 3 requests on 2 slots
    assert llm.engine.stats["mixed_steps"] > before
    assert texts == [e.text for e in expected] and ids == [e.token_ids for e in expected]
    assert lps == [pytest.approx(e.logprobs, abs=1e-5) for e in expected]
    assert state == {"running": 0, "waiting": 0, "free_slots": 2, "slots": 2, "tracked": 0}


def test_can_mix_covers_packs_past_the_graph_buckets(device):
    """Decode rows mix with any prompt pack the in-pool forward takes; without decode rows, without
    pieces, or with more decode rows than the largest decode bucket, the two run apart."""
    llm = LLM("xlstm-tiny", device=device, dtype="float32", max_num_seqs=4, max_graph_prefill_tokens=32)
    runner = llm.engine.runner
    assert runner.mixed_layout(2, [16]) is not None and runner.can_mix(2, [16])  # a graph bucket
    assert runner.mixed_layout(2, [100]) is None and runner.can_mix(2, [100, 7])  # past the buckets: in-pool
    assert not runner.can_mix(0, [100]) and not runner.can_mix(2, [])
    assert not runner.can_mix(runner.buckets[-1] + 1, [100])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=7),
    SamplingParams(temperature=0.7, seed=3, max_tokens=5, logprobs=1),
], ids=["greedy", "sampled-logprobs"])
def test_trickle_prefill_in_deferred_mixed_steps_equals_eager_generate(device, params, tmp_path):
    """Trickle prefill: prompts go in pieces of at most 4 tokens inside the decode steps' forwards, and
    with async scheduling each mixed step's tokens are read only after the next step has launched.
    Every output equals eager generation, and both things did happen."""
    log = tmp_path / "steps.jsonl"
    llm = LLM("xlstm-tiny", device=device, dtype="float32", max_num_seqs=3, mixed_steps=True, trickle_tokens=4,
              async_scheduling=True, step_log=log)
    sched = llm.engine.scheduler
    sched.trickle_min_decode, sched.trickle_backlog = 1, 10_000  # trickle whenever anything decodes
    runner = llm.engine.runner
    launches, launched_at, deferred = [0], {}, []

    def counting(fn):
        def launch(*args, **kwargs):
            launches[0] += 1
            pending = fn(*args, **kwargs)
            launched_at[id(pending)] = launches[0]
            return pending
        return launch

    collect = runner.prefill_collect

    def collect_noting(pending):
        deferred.append(launches[0] > launched_at.get(id(pending), launches[0]))
        return collect(pending)

    runner.prefill_launch = counting(runner.prefill_launch)
    runner.decode_launch = counting(runner.decode_launch)
    runner.prefill_collect = collect_noting
    prompts = PROMPTS + ["the quick brown fox jumps over the lazy dog"]
    # Staggered lengths: requests finish at different steps, so prompts join while others decode.
    plist = [dataclasses.replace(params, max_tokens=params.max_tokens + i % 3 * 2) for i in range(len(prompts))]
    outs = llm.generate(prompts, plist, use_tqdm=False)
    ref = [generate(llm.model, llm.tokenizer, [p], q)[0] for p, q in zip(prompts, plist)]
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids and o.finish_reason == r.finish_reason
        if params.logprobs is not None:
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-4)
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    trickled = [s for s in steps if s["decode"] and s["prefill_tokens"]]
    assert trickled and all(s["prefill_tokens"] <= 4 for s in trickled)
    assert any(deferred), "no mixed step's tokens were read after the next launch"


def test_forked_prompt_in_a_mixed_step_is_read_at_once(device):
    """A prompt with forked siblings (n > 1) that finishes in a mixed step is read at that step's end:
    its siblings start from its prompt state, which the next step (already launched with async
    scheduling) would advance. With another request decoding alongside, both greedy completions equal
    a lone request's (greedy, so a sibling's state error shows in its tokens, not only in noise)."""
    llm = LLM("xlstm-tiny", device=device, dtype="float32", max_num_seqs=4, mixed_steps=True, trickle_tokens=4,
              async_scheduling=True)
    engine = llm.engine
    engine.scheduler.trickle_min_decode = 1
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    long_run = engine.add_request("The river", dataclasses.replace(greedy, max_tokens=30))
    engine.step()  # the first request's prefill: it decodes from the next step on
    mixed_before = engine.stats["mixed_steps"]
    rid = engine.add_request("Once upon a time", greedy, n=2)
    done = {k: out.output.token_ids for k, out in drain(engine).items()}
    assert engine.stats["mixed_steps"] > mixed_before
    assert set(done) == {long_run, rid, f"{rid}:1"}
    alone = llm.generate(["Once upon a time", "The river"], [greedy, dataclasses.replace(greedy, max_tokens=30)],
                         use_tqdm=False)
    assert done[rid] == done[f"{rid}:1"] == alone[0].token_ids
    assert done[long_run] == alone[1].token_ids
