"""Eager generation on a tiny random model: greedy = teacher-forced argmax, ragged batch = one by one,
seeded sampling, stop ids and strings, streaming, chat state hand-over, bad input."""

from __future__ import annotations

import pytest
import torch

from fast_xlstm.generation.chat import ChatSession
from fast_xlstm.generation.generate import generate, stream_generate
from fast_xlstm.generation.params import SamplingParams

from modelutil import tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
PROMPTS = ["Once upon a time", "The river", "A", "Über die Brücke ging 🐟 der Fisch, and then"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=99)


@torch.no_grad()
def test_greedy_equals_teacher_forced_argmax(model, tiny_tokenizer):
    out = generate(model, tiny_tokenizer, PROMPTS[0], GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    full = torch.tensor([out.prompt_token_ids + out.token_ids])
    logits, _ = model(full)
    p = len(out.prompt_token_ids)
    assert logits[0, p - 1:-1].argmax(-1).tolist() == out.token_ids


def test_ragged_batch_equals_one_by_one(model, tiny_tokenizer):
    batch = generate(model, tiny_tokenizer, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batch):
        alone = generate(model, tiny_tokenizer, prompt, GREEDY)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text
    assert batch[0].prompt_token_ids[0] == 0  # BOS inserted, once
    assert batch[0].prompt_token_ids.count(0) == 1


def test_seeded_sampling_is_reproducible_and_batch_independent(model, tiny_tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    a = generate(model, tiny_tokenizer, PROMPTS[1], params)[0]
    b = generate(model, tiny_tokenizer, PROMPTS[1], params)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=5), params, SamplingParams(temperature=0.5, seed=3)]
    c = generate(model, tiny_tokenizer, [PROMPTS[0], PROMPTS[1], PROMPTS[2]], others)[1]
    assert a.token_ids == b.token_ids == c.token_ids
    d = generate(model, tiny_tokenizer, PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, seed=8,
                                                                  max_tokens=10))[0]
    assert d.token_ids != a.token_ids


def test_stop_token_ids_and_model_stop_ids(model, tiny_tokenizer):
    ref = generate(model, tiny_tokenizer, PROMPTS[0], GREEDY)[0]
    stop_at = ref.token_ids[3]
    out = generate(model, tiny_tokenizer, PROMPTS[0], SamplingParams(temperature=0, max_tokens=12,
                                                                     stop_token_ids=[stop_at]))[0]
    first = ref.token_ids.index(stop_at)
    assert out.token_ids == ref.token_ids[:first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)

    # A model that always predicts id 0 (the EOD/BOS token the 7B ended documents with) stops at once.
    eod = tiny_model(seed=99)
    with torch.no_grad():
        eod.lm_head.weight[0] = 50 * eod.lm_head.weight.abs().max()
    out = generate(eod, tiny_tokenizer, PROMPTS[0], GREEDY)[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == ([0], "stop", 0)
    ignored = generate(eod, tiny_tokenizer, PROMPTS[0], SamplingParams(temperature=0, max_tokens=4,
                                                                       ignore_eos=True))[0]
    assert ignored.token_ids[0] == 0 and len(ignored.token_ids) == 4 and ignored.finish_reason == "length"


def test_stop_strings_truncate_and_stream_consistently(model, tiny_tokenizer):
    params = SamplingParams(temperature=0, max_tokens=40)
    ref = generate(model, tiny_tokenizer, PROMPTS[3], params)[0]
    text = ref.text
    assert len(text) > 12
    stop = text[8:11]
    first = text.find(stop)
    for include in (False, True):
        p = SamplingParams(temperature=0, max_tokens=40, stop=[stop, "never-there"],
                           include_stop_str_in_output=include)
        outputs = []
        deltas = [e.text for e in stream_generate(model, tiny_tokenizer, [PROMPTS[3]], p, outputs=outputs)]
        out = outputs[0]
        assert out.text == text[:first + (len(stop) if include else 0)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert "".join(deltas) == out.text  # streamed text never includes what the stop string removed


def test_streaming_deltas_join_to_the_output(model, tiny_tokenizer):
    outputs = []
    events = list(stream_generate(model, tiny_tokenizer, PROMPTS, SamplingParams(temperature=0.9, seed=1,
                                                                                max_tokens=15), outputs=outputs))
    for j, out in enumerate(outputs):
        mine = [e for e in events if e.index == j]
        assert "".join(e.text for e in mine) == out.text
        assert [e.token_id for e in mine] == out.token_ids
        assert mine[-1].finish_reason == out.finish_reason and all(e.finish_reason is None for e in mine[:-1])


def test_logprobs_are_reported(model, tiny_tokenizer):
    out = generate(model, tiny_tokenizer, PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
    assert len(out.logprobs) == 5 and all(len(t) == 3 for t in out.top_logprobs)
    for lp, top, tok in zip(out.logprobs, out.top_logprobs, out.token_ids):
        assert lp <= 0 and max(top.values()) == pytest.approx(lp) and tok in top  # greedy: the top one


def test_starting_states_and_bf16_state(model, tiny_tokenizer):
    ids = tiny_tokenizer.encode(PROMPTS[3])
    whole = generate(model, tiny_tokenizer, [ids], GREEDY)[0]
    head = generate(model, tiny_tokenizer, [ids[:5]], SamplingParams(temperature=0, max_tokens=1))[0]
    # head.state has consumed ids[:5]; continue with the rest of the prompt.
    cont = generate(model, tiny_tokenizer, [ids[5:]], GREEDY, states=head.state)[0]
    assert cont.token_ids == whole.token_ids
    bf = generate(model, tiny_tokenizer, PROMPTS[0], GREEDY, state_dtype=torch.bfloat16)[0]
    assert bf.state[0][0].dtype == torch.bfloat16 and len(bf.token_ids) == GREEDY.max_tokens


def test_chat_turn_prefills_only_new_tokens_and_matches_full_history(model, tiny_tokenizer):
    chat = ChatSession(model, tiny_tokenizer, SamplingParams(temperature=0, max_tokens=8), system="Be brief.")
    first = "".join(chat.send("Hello there"))
    pending_1 = list(chat.pending)
    history_after_1 = list(chat.history) + pending_1
    second = "".join(chat.send("And then?"))
    new_ids = tiny_tokenizer.encode("\nUser: And then?\nAssistant:", add_bos=False)
    # Only the pending last reply token and the new message are prefilled, never the history.
    assert chat.last_prefill_tokens == len(pending_1) + len(new_ids) < len(history_after_1)
    # The same turn from scratch over the full token history gives the same reply.
    full = generate(model, tiny_tokenizer, [history_after_1 + new_ids],
                    SamplingParams(temperature=0, max_tokens=8, stop=["\nUser:"]))[0]
    assert full.text == second
    assert isinstance(first, str) and chat.turns == 2


@pytest.mark.parametrize("prompts, match", [
    ("", "prompt 0 is empty"),
    ([[]], "prompt 0 has no tokens"),
    ([[1, 2, 5000]], "outside \\[0, 1024\\)"),
    ([], "no prompts"),
])
def test_bad_prompts(model, tiny_tokenizer, prompts, match):
    with pytest.raises(ValueError, match=match):
        generate(model, tiny_tokenizer, prompts, GREEDY)


def test_params_count_must_match(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        generate(model, tiny_tokenizer, PROMPTS[:3], [GREEDY, GREEDY])
