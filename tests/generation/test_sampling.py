import math

import pytest
import torch

from fast_xlstm.generation.params import SamplingParams
from fast_xlstm.generation.sampling import (
    SamplingTensors,
    add_token_counts_,
    apply_penalties,
    apply_temperature_topk_topp_minp,
    counter_exponential_noise,
    resolve_seed,
    prompt_mask_from_ids,
    sample,
    sample_tokens,
)


def _rows(b: int, **kw: float) -> dict[str, torch.Tensor]:
    """[B] parameter tensors, defaults = all filters off, temperature 1."""
    d = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0} | kw
    return {
        "temperature": torch.full((b,), float(d["temperature"])),
        "top_k": torch.full((b,), int(d["top_k"]), dtype=torch.int64),
        "top_p": torch.full((b,), float(d["top_p"])),
        "min_p": torch.full((b,), float(d["min_p"])),
    }


def _sample(logits: torch.Tensor, **rows: torch.Tensor) -> torch.Tensor:
    """`sample` with counter noise for rows seeded 0..B-1 at step 0 (fresh noise per row)."""
    b, v = logits.shape
    noise = counter_exponential_noise(torch.arange(b), torch.zeros(b, dtype=torch.int64), v)
    return sample(logits, **rows, noise=noise)


def _logits(b: int = 6, v: int = 97, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    tokens = _sample(logits, **_rows(6, temperature=0.0))
    assert torch.equal(tokens, logits.argmax(-1))
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_is_greedy(seed: int) -> None:
    logits = _logits(seed=seed)
    torch.manual_seed(seed)
    assert torch.equal(_sample(logits, **_rows(6, top_k=1, temperature=1.5)), logits.argmax(-1))


@pytest.mark.parametrize("seed", range(5))
def test_tiny_top_p_is_greedy(seed: int) -> None:
    logits = _logits(seed=seed)
    torch.manual_seed(seed)
    assert torch.equal(_sample(logits, **_rows(6, top_p=1e-6)), logits.argmax(-1))


def test_filters_off_only_scale_by_temperature() -> None:
    logits = _logits()
    out = apply_temperature_topk_topp_minp(logits, **_rows(6, temperature=2.0))
    assert torch.equal(out, logits / 2.0)
    assert torch.equal(apply_temperature_topk_topp_minp(logits, **_rows(6, temperature=0.0)), logits)


def test_top_k_keeps_k_largest() -> None:
    logits = _logits()
    k = torch.tensor([1, 2, 5, 0, 97, 200])
    out = apply_temperature_topk_topp_minp(logits, **(_rows(6) | {"top_k": k}))
    kept = torch.isfinite(out).sum(-1)
    assert kept.tolist() == [1, 2, 5, 97, 97, 97]
    for row in range(3):
        top = set(logits[row].topk(int(k[row])).indices.tolist())
        assert set(torch.isfinite(out[row]).nonzero().flatten().tolist()) == top


def test_top_p_matches_hand_computation() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.5, 0.05, 0.3, 0.15]]))
    out = apply_temperature_topk_topp_minp(logits, **(_rows(2) | {"top_p": torch.tensor([0.8, 0.81])}))
    # mass before: 0.5 -> 0, 0.3 -> 0.5, 0.15 -> 0.8, 0.05 -> 0.95
    assert torch.isfinite(out[0]).tolist() == [True, False, True, False]
    assert torch.isfinite(out[1]).tolist() == [True, False, True, True]


def test_min_p_keeps_tokens_above_fraction_of_max() -> None:
    probs = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]])
    out = apply_temperature_topk_topp_minp(probs.log(), **_rows(1, min_p=0.3))
    # threshold 0.3 * 0.40 = 0.12
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False, False, False]
    logits = _logits(b=1, v=500)
    torch.manual_seed(0)
    draws = _sample(logits.expand(4000, -1).contiguous(), **_rows(4000, min_p=0.2))
    p = logits.softmax(-1)[0]
    allowed = set((p >= 0.2 * p.max()).nonzero().flatten().tolist())
    assert set(draws.tolist()) <= allowed and len(set(draws.tolist())) > 1


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_frequencies_follow_tempered_softmax(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 40_000
    torch.manual_seed(1234)
    draws = _sample(logits.expand(n, -1).contiguous(), **_rows(n, temperature=temperature))
    freq = torch.bincount(draws, minlength=5).float() / n
    expected = (logits / temperature).softmax(-1)
    # 4 sigma of a binomial proportion at n=40k is < 0.01
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_higher_temperature_is_flatter() -> None:
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0])
    n = 20_000
    top_share = []
    for t in (0.3, 1.0, 3.0):
        torch.manual_seed(7)
        draws = _sample(logits.expand(n, -1).contiguous(), **_rows(n, temperature=t))
        top_share.append((draws == 0).float().mean().item())
    assert top_share[0] > 0.99 and top_share[0] > top_share[1] > top_share[2] > 0.4


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    counts = torch.tensor([[0, 2, 1, 0, 0], [3, 0, 0, 0, 0]], dtype=torch.int32)
    prompt = torch.tensor([[True, False, False, True, False], [False] * 5])
    out = apply_penalties(
        logits,
        counts,
        prompt,
        repetition_penalty=torch.tensor([2.0, 1.0]),
        presence_penalty=torch.tensor([0.5, 0.0]),
        frequency_penalty=torch.tensor([0.25, -0.5]),
    )
    # row 0: seen = {0 (prompt), 1, 2 (output), 3 (prompt)}; output counts 1:2, 2:1
    row0 = [2.0 / 2, -1.0 * 2 - 0.5 - 0.25 * 2, 0.5 / 2 - 0.5 - 0.25 * 1, -0.5 * 2, 1.0]
    # row 1: repetition off; token 0 generated 3 times, frequency -0.5
    row1 = [2.0 + 0.5 * 3, -1.0, 0.5, -0.5, 1.0]
    assert torch.allclose(out, torch.tensor([row0, row1]))
    no_op = apply_penalties(logits, counts, prompt, torch.ones(2), torch.zeros(2), torch.zeros(2))
    assert torch.equal(no_op, logits)


def test_penalty_state_helpers() -> None:
    mask = prompt_mask_from_ids([[0, 3, 3], [], [4]], vocab_size=5, device="cpu")
    assert mask.tolist() == [[True, False, False, True, False], [False] * 5, [False, False, False, False, True]]
    counts = torch.zeros(2, 4, dtype=torch.int32)
    add_token_counts_(counts, torch.tensor([1, 3]))
    add_token_counts_(counts, torch.tensor([1, 0]))
    assert counts.tolist() == [[0, 2, 0, 0], [1, 0, 0, 1]]


def _decode_steps(params: list[SamplingParams], logits_seq: list[torch.Tensor], row_of_interest: int) -> list[int]:
    """Sample len(logits_seq) steps for a batch; return the tokens of one row."""
    st = SamplingTensors.from_params(params, vocab_size=logits_seq[0].shape[-1], device="cpu")
    counts = torch.zeros(len(params), logits_seq[0].shape[-1], dtype=torch.int32)
    out = []
    for step, logits in enumerate(logits_seq):
        steps = torch.full((len(params),), step, dtype=torch.int64)
        tokens = sample_tokens(logits[: len(params)].clone(), st, steps, counts)
        add_token_counts_(counts, tokens)
        out.append(int(tokens[row_of_interest]))
    return out


def test_seeded_sampling_independent_of_batch() -> None:
    v, steps = 300, 12
    seq = [_logits(b=5, v=v, seed=100 + s) for s in range(steps)]
    target = SamplingParams(temperature=0.9, top_k=50, seed=1234, frequency_penalty=0.3)
    alone = _decode_steps([target], [x[:1] for x in seq], 0)
    again = _decode_steps([target], [x[:1] for x in seq], 0)
    assert alone == again
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.5, seed=7),
        SamplingParams(min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=1.5),
    ]
    for pos in (0, 2, 4):
        batch = others[:pos] + [target] + others[pos:]
        batch_seq = [torch.cat([x[1:][:pos], x[:1], x[1:][pos:]]) for x in seq]
        torch.manual_seed(pos)  # unseeded rows draw differently each time
        assert _decode_steps(batch, batch_seq, pos) == alone


def test_different_seeds_differ() -> None:
    v, steps = 1000, 20
    seq = [torch.zeros(1, v) for _ in range(steps)]  # uniform: seeds decide everything
    runs = {tuple(_decode_steps([SamplingParams(seed=s)], seq, 0)) for s in range(4)}
    assert len(runs) == 4


def test_counter_noise_is_a_pure_function_of_seed_step_and_token() -> None:
    seeds, steps = torch.tensor([1, 2, 1]), torch.tensor([0, 0, 5])
    noise = counter_exponential_noise(seeds, steps, 5000)
    assert noise.shape == (3, 5000) and bool(torch.isfinite(noise).all()) and bool((noise > 0).all())
    alone = counter_exponential_noise(torch.tensor([2]), torch.tensor([0]), 5000)
    assert torch.equal(noise[1], alone[0])  # independent of the other rows
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    # Exp(1): mean 1, variance 1, P(X > 1) = e^-1 (50k draws: a few standard errors of slack).
    big = counter_exponential_noise(torch.arange(10), torch.zeros(10, dtype=torch.int64), 5000).double()
    assert abs(big.mean().item() - 1) < 0.02 and abs(big.var().item() - 1) < 0.05
    assert abs((big > 1).double().mean().item() - math.exp(-1)) < 0.01
    # Neighbouring seeds and steps are not correlated.
    a = counter_exponential_noise(torch.tensor([7]), torch.tensor([3]), 20000)[0]
    b = counter_exponential_noise(torch.tensor([8]), torch.tensor([3]), 20000)[0]
    c = counter_exponential_noise(torch.tensor([7]), torch.tensor([4]), 20000)[0]
    assert abs(torch.corrcoef(torch.stack([a, b, c]))[0, 1:]).max() < 0.05
    logits = _logits(b=3, v=50)
    tokens = sample(logits, **_rows(3), noise=noise[:, :50])
    assert torch.equal(tokens, (logits.softmax(-1) / noise[:, :50]).argmax(-1))
    assert resolve_seed(5) == 5 and resolve_seed(None) != resolve_seed(None)


def test_sampling_tensors_from_params() -> None:
    params = [SamplingParams(temperature=0), SamplingParams(top_k=-1, top_p=0.9), SamplingParams(top_k=2000)]
    st = SamplingTensors.from_params(params, vocab_size=1024, device="cpu")
    assert st.top_k.tolist() == [0, 0, 0] and st.temperature.tolist() == [0.0, 1.0, 1.0]
    assert not st.all_greedy and st.do_top_p and not st.do_top_k and not st.do_min_p and not st.do_penalties
    assert st.seeds.shape == (3,) and st.seeds.dtype == torch.int64
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0, top_k=5)], 10, "cpu")
    assert greedy.all_greedy and not greedy.do_top_k
    pen = SamplingTensors.from_params([SamplingParams(presence_penalty=1.0, seed=3)], 10, "cpu")
    assert pen.do_penalties and pen.seeds.tolist() == [3]
    with pytest.raises(ValueError, match="token_counts"):
        sample_tokens(torch.zeros(1, 10), pen, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="seeds"):
        SamplingTensors.from_params(params, 1024, "cpu", seeds=[1])
