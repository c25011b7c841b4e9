import math

import pytest

from fast_xlstm.generation.params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert p.temperature == 1.0 and p.top_k == 0 and p.top_p == 1.0 and p.min_p == 0.0
    assert p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
    assert p.seed is None and p.max_tokens == 16 and p.logprobs is None
    assert p.stop == [] and p.stop_token_ids == [] and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.is_greedy and not p.has_penalties


def test_normalization() -> None:
    p = SamplingParams(temperature=0, stop="###", stop_token_ids=(5, 7), top_k=-1, seed=3, logprobs=0)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 7]
    assert isinstance(p.temperature, float) and p.is_greedy
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []
    assert SamplingParams(repetition_penalty=1.2).has_penalties
    assert SamplingParams(top_p=1, min_p=1, presence_penalty=-2, frequency_penalty=2).top_p == 1.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1.0"),
        ("temperature", True),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", None),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_p", math.nan),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.inf),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.01),
        ("frequency_penalty", 3),
        ("frequency_penalty", math.nan),
        ("seed", 1.0),
        ("seed", "7"),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", 2.0),
        ("stop_token_ids", [1, -1]),
        ("stop_token_ids", [1, 2.0]),
        ("stop_token_ids", 3),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop", 5),
        ("ignore_eos", 1),
        ("include_stop_str_in_output", "yes"),
        ("logprobs", -1),
        ("logprobs", 1.0),
    ],
)
def test_invalid_values_raise_naming_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
