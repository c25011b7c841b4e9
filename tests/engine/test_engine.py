"""The engine and the offline `LLM` API on a tiny model: same outputs as eager generation under slot
pressure and chunked prefill, teacher-forced decode through the runner equals a full forward
(on CUDA through the captured graphs), abort frees slots."""

from __future__ import annotations

import json

import pytest
import torch

from fast_xlstm import LLM, SamplingParams, generate
from fast_xlstm.engine.runner import DecodeMode, _by_rows

from modelutil import drain, random_ids, rel_err

PROMPTS = ["Once upon a time", "The river", "A", "Über die Brücke ging 🐟 der Fisch, and then", "x y z",
           "hello there, how are you doing today?", "7"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", params=[(False, False), (True, False), (False, True), (True, True)],
                ids=["sync", "async-scheduling", "mixed-steps", "mixed-steps-async"])
def llm(request):
    # 3 slots for 7 prompts and an 8-token step budget: queueing and chunked prefill on every run;
    # with async scheduling each step's decode is launched before the previous one is read; with
    # mixed steps a step's decoding requests ride in its prefill forward as one-token pieces.
    async_scheduling, mixed_steps = request.param
    return LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=3, max_num_batched_tokens=8,
               async_scheduling=async_scheduling, mixed_steps=mixed_steps)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12),
    SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=3, max_tokens=10),
    SamplingParams(temperature=0.7, seed=5, max_tokens=9, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.2, logprobs=3),
    SamplingParams(temperature=0, max_tokens=30, stop=["e"]),
])
def test_llm_equals_eager_generate(llm, params):
    mixed_before = llm.engine.stats["mixed_steps"]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    ref = generate(llm.model, llm.tokenizer, PROMPTS, params)
    # Not vacuous: with mixed steps on, decoding requests did ride in prefill forwards here (mixed
    # steps need the device-table kernels: on CUDA; on CPU tests/ops/triton/test_mixed_engine.py
    # runs them in Triton's interpreter).
    mixing = llm.engine.mixed_steps and llm.engine.runner.planned_prefill
    assert (llm.engine.stats["mixed_steps"] > mixed_before) == mixing
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids and o.text == r.text and o.finish_reason == r.finish_reason
        if params.logprobs is not None:
            assert o.top_logprobs[0].keys() == r.top_logprobs[0].keys()
            assert o.logprobs == pytest.approx(r.logprobs, abs=1e-4)


def test_llm_mixed_params_and_token_prompts(llm):
    params = [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=1.0, seed=1, max_tokens=7)]
    prompts = [[0, 5, 6, 7], "The river"]
    outs = llm.generate(prompts, params, use_tqdm=True)
    ref = generate(llm.model, llm.tokenizer, prompts, params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [len(o.token_ids) for o in outs] == [5, 7]


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3])
def test_teacher_forced_decode_equals_full_forward(llm, batch):
    engine = llm.engine
    runner, model = engine.runner, llm.model
    seqs = random_ids((batch, 24), seed=batch).to(model.device)
    slots = [2, 0, 1][:batch]  # not in row order, and with batch 1 two slots idle
    for slot in slots:
        runner.start_request(slot, [], SamplingParams(temperature=0), seed=0)
    prompt = 10
    runner.prefill(slots, [s[:prompt].tolist() for s in seqs], [True] * batch, [SamplingParams(temperature=0)] * batch)
    full, _ = model(seqs)
    mode = DecodeMode(sample=False, filters=False, penalties=False, logprobs=False, logits=True)
    for t in range(prompt, seqs.shape[1]):
        runner.set_last_tokens(slots, seqs[:, t].tolist())
        result = runner.decode(slots, mode)
        assert rel_err(result.logits.cpu(), full[:, t].cpu()) < 1e-4  # fp32 model and state
    assert not engine.has_unfinished_requests()


def test_abort_frees_the_slot(llm):
    engine = llm.engine
    ids = [engine.add_request("Once upon a time", SamplingParams(temperature=0, max_tokens=50)) for _ in range(4)]
    engine.step()
    assert engine.scheduler.num_free_slots == 0 and len(engine.scheduler.waiting) == 1
    assert engine.abort(ids[0]) and not engine.abort(ids[0]) and not engine.abort("nope")
    assert engine.scheduler.num_free_slots == 1
    for rid in ids[1:]:
        engine.abort(rid)
    assert engine.scheduler.num_free_slots == 3 and not engine.has_unfinished_requests()


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="state_dtype"):
        LLM("xlstm-tiny", device="cpu", state_dtype="float16")
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("a", request_id="same"), llm.engine.add_request("b", request_id="same")
    llm.engine.abort("same")


def test_n_completions_fork_one_prefill(llm):
    engine = llm.engine
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=6)
    before = engine.stats["prompt_tokens"]
    rid = engine.add_request("Once upon a time", params, n=3)
    done = drain(engine)
    assert set(done) == {rid, f"{rid}:1", f"{rid}:2"} and [done[r].index for r in sorted(done)] == [0, 1, 2]
    prompt_len = len(done[rid].prompt_token_ids)
    assert engine.stats["prompt_tokens"] - before == prompt_len  # prefilled once for three completions
    # Completion i equals a lone request with seed 11 + i (same prompt state, own seed).
    for i, r in enumerate((rid, f"{rid}:1", f"{rid}:2")):
        alone = llm.generate(["Once upon a time"], SamplingParams(temperature=1.0, seed=11 + i, max_tokens=6),
                             use_tqdm=False)[0]
        assert done[r].output.token_ids == alone.token_ids
    assert len({tuple(o.output.token_ids) for o in done.values()}) > 1
    with pytest.raises(ValueError, match="n must be"):
        engine.add_request("x", params, n=0)
    with pytest.raises(ValueError, match="n=4 completions need more than the 3 slots"):
        engine.add_request("x", params, n=4)


def test_abort_parent_aborts_waiting_siblings(llm):
    engine = llm.engine
    rid = engine.add_request("Once upon a time", SamplingParams(max_tokens=50), n=2)
    assert engine.abort(rid)
    assert not engine.has_unfinished_requests() and engine.scheduler.num_free_slots == 3


def test_compiled_decode_step_and_prefill_equal_eager():
    """Regional torch.compile of the blocks' decode step and prefill regions (inductor; C++ on CPU,
    Triton on CUDA) gives the eager outputs."""
    llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=2, compile_decode=True,
              compile_prefill=True)
    assert all(getattr(b, "_step_slots_compiled", False) and getattr(b, "_regions_compiled", False)
               for b in llm.model.backbone.blocks)
    params = SamplingParams(temperature=0, max_tokens=6)
    outs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    ref = generate(llm.model, llm.tokenizer, PROMPTS[:3], params)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


def test_one_row_decode_steps_compile_in_their_own_mode():
    """`batch1_compile_mode`: one-row decode steps run a graph compiled in that mode, larger batches
    the general one; both give the eager tokens."""
    llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=2, compile_decode=True,
              batch1_compile_mode="max-autotune-no-cudagraphs")
    params = SamplingParams(temperature=0, max_tokens=6)
    ref = generate(llm.model, llm.tokenizer, PROMPTS[:2], params)
    assert llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].token_ids == ref[0].token_ids  # batch 1
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)] == [r.token_ids for r in ref]
    calls: list[str] = []
    step = _by_rows(lambda *a: calls.append("one row"), lambda *a: calls.append("general"))
    for rows in (1, 2, 1, 64):
        step(torch.zeros(rows, 8), None, None)
    assert calls == ["one row", "general", "one row", "general"]


def test_prefill_in_state_bounded_groups_equals_one_group(llm):
    runner = llm.engine.runner
    saved = runner.prefill_state_bytes
    try:
        runner.prefill_state_bytes = 1  # one sequence per group
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    finally:
        runner.prefill_state_bytes = saved
    ref = generate(llm.model, llm.tokenizer, PROMPTS, SamplingParams(temperature=0, max_tokens=5))
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


def test_balanced_groups_cover_everything_evenly():
    from fast_xlstm.engine.runner import balanced_groups

    assert balanced_groups(32, 31) == [(0, 16), (16, 32)]  # not 31 + a straggler of 1
    assert balanced_groups(33, 31) == [(0, 17), (17, 33)]
    assert balanced_groups(31, 31) == [(0, 31)]
    assert balanced_groups(5, 1) == [(j, j + 1) for j in range(5)]
    assert balanced_groups(0, 4) == []
    for n in range(1, 70):
        for most in (1, 2, 7, 31, 64):
            bounds = balanced_groups(n, most)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
            assert len(bounds) == -(-n // most) and max(sizes) <= most and max(sizes) - min(sizes) <= 1


def test_step_log_records_every_step(tmp_path):
    log = tmp_path / "steps.jsonl"
    llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=2, max_num_batched_tokens=8, step_log=log)
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(rows) == llm.engine.stats["steps"]
    assert sum(r["prefill_tokens"] for r in rows) == sum(len(o.prompt_token_ids) for o in outs)
    assert sum(r["admitted"] for r in rows) == 3 and max(r["running"] for r in rows) == 2
    assert all(r["prefill_tokens"] + r["decode"] <= 8 or r["prefill_seqs"] == 1 for r in rows)  # the step budget
    assert all(r["ms"] > 0 for r in rows) and rows[-1]["running"] == rows[-1]["waiting"] == 0
    assert all(r["gc_ms"] >= 0 for r in rows)


def test_step_log_counts_garbage_collection_time(tmp_path):
    """A collection during a step shows up in that step's gc_ms (the step-log field that tells a slow
    step from a collection pause)."""
    import gc
    log = tmp_path / "steps.jsonl"
    llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=2, step_log=log)
    junk = [[i] for i in range(300_000)]  # many tracked objects: a full collection takes milliseconds
    llm.engine.add_request(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2))
    real_step = llm.engine.scheduler.schedule

    def schedule_and_collect():
        gc.collect()
        return real_step()

    llm.engine.scheduler.schedule = schedule_and_collect
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    del junk
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert rows and all(r["gc_ms"] > 0.5 for r in rows)


def test_engine_warm_up_then_same_outputs_and_free_slots():
    llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=3, max_graph_prefill_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=5)
    assert llm.engine.warm_up() >= 0
    assert llm.engine.scheduler.num_free_slots == 3
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in generate(llm.model, llm.tokenizer, PROMPTS, params)]
    llm.engine.add_request("queued", params)
    with pytest.raises(RuntimeError, match="idle engine"):
        llm.engine.warm_up()


@pytest.mark.parametrize("max_tokens", [1, 2, 6])
def test_async_scheduling_launches_no_step_past_max_tokens(max_tokens):
    """A request the step in flight brings to max_tokens is not launched again: max_tokens - 1
    decode steps (the first token comes from prefill), the same tokens as synchronous steps."""
    outs = {}
    for mode in (False, True):
        llm = LLM("xlstm-tiny", device=DEVICE, dtype="float32", max_num_seqs=2, async_scheduling=mode)
        launches = []
        launch = llm.engine.runner.decode_launch
        llm.engine.runner.decode_launch = lambda slots, m, _f=launch: launches.append(len(slots)) or _f(slots, m)
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs[mode] = [o.token_ids for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
        if mode:
            assert sum(launches) == 2 * (max_tokens - 1), launches
    assert outs[True] == outs[False] and all(len(t) == max_tokens for t in outs[True])


def test_llm_schedules_asynchronously_by_default():
    """Offline generation queues each decode step before reading the previous one (as the server
    does); the parametrized tests above show both modes give eager generation's outputs."""
    assert LLM("xlstm-tiny", device="cpu", max_num_seqs=1).engine.async_scheduling
    assert not LLM("xlstm-tiny", device="cpu", max_num_seqs=1, async_scheduling=False).engine.async_scheduling
