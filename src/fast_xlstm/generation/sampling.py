"""Token sampling as batched tensor functions with per-row parameters.

No host syncs and no loops over the batch, except drawing the per-row noise for seeded rows, so
that a CUDA-graph decode step can reuse the same functions on static buffers. Sampling uses the
exponential race ``argmax(probs / q)``, ``q ~ Exp(1)`` i.i.d. (equivalent to Gumbel-max): given
the noise it is one batched op. The noise is a pure function of (request seed, step, token id)
(``counter_exponential_noise``), so a seeded request draws the same tokens whatever else is in the
batch, on CPU and GPU, in eager code and inside a CUDA graph.

Order of operations (vLLM / HF): penalties -> temperature -> top-k -> top-p -> min-p -> sample.
Rows with temperature < ``GREEDY_EPS`` take the argmax of the penalized logits.

Shapes: B = batch rows, V = vocabulary size. Logits are fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fast_xlstm.generation.params import GREEDY_EPS, SamplingParams

__all__ = [
    "SamplingTensors",
    "add_token_counts_",
    "apply_penalties",
    "apply_temperature_topk_topp_minp",
    "counter_exponential_noise",
    "token_logprobs",
    "resolve_seed",
    "prompt_mask_from_ids",
    "sample",
    "sample_tokens",
]


# --------------------------------------------------------------------------- penalties
def apply_penalties(
    logits: Tensor,
    token_counts: Tensor,
    prompt_mask: Tensor | None,
    repetition_penalty: Tensor,
    presence_penalty: Tensor,
    frequency_penalty: Tensor,
) -> Tensor:
    """Repetition (HF/vLLM), presence and frequency (OpenAI) penalties; returns new logits.

    Args:
        logits: [B, V] float.
        token_counts: [B, V] int or float, how often each token was generated so far (output only).
        prompt_mask: [B, V] bool, tokens present in the prompt, or None.
        repetition_penalty: [B]; for tokens in prompt or output, positive logits are divided by
            it and negative ones multiplied; 1 is a no-op.
        presence_penalty: [B]; subtracted once from every token generated at least once.
        frequency_penalty: [B]; subtracted once per generated occurrence.
    Returns:
        [B, V] logits, same dtype.
    """
    counts = token_counts.to(logits.dtype)
    generated = token_counts > 0
    seen = generated if prompt_mask is None else generated | prompt_mask
    rp = repetition_penalty.to(logits.dtype)[:, None]
    penalized = torch.where(logits > 0, logits / rp, logits * rp)
    logits = torch.where(seen, penalized, logits)
    presence = presence_penalty.to(logits.dtype)[:, None]
    frequency = frequency_penalty.to(logits.dtype)[:, None]
    return logits - presence * generated.to(logits.dtype) - frequency * counts


def prompt_mask_from_ids(prompt_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str) -> Tensor:
    """[B, V] bool mask of the tokens present in each row's prompt (built once at prefill)."""
    rows = [i for i, ids in enumerate(prompt_ids) for _ in ids]
    cols = [int(t) for ids in prompt_ids for t in ids]
    mask = torch.zeros(len(prompt_ids), vocab_size, dtype=torch.bool)
    if cols:
        mask[torch.tensor(rows), torch.tensor(cols)] = True
    return mask.to(device)


def add_token_counts_(token_counts: Tensor, tokens: Tensor) -> Tensor:
    """In place: ``token_counts[b, tokens[b]] += 1``. token_counts [B, V], tokens [B] int64."""
    ones = torch.ones_like(tokens, dtype=token_counts.dtype)[:, None]
    return token_counts.scatter_add_(1, tokens[:, None], ones)


# --------------------------------------------------------------------------- filtering
def apply_temperature_topk_topp_minp(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    *,
    do_top_k: bool = True,
    do_top_p: bool = True,
    do_min_p: bool = True,
) -> Tensor:
    """Scale by temperature and set filtered-out logits to -inf; returns new [B, V] logits.

    Args:
        logits: [B, V] float.
        temperature: [B]; rows below ``GREEDY_EPS`` are left unscaled (they are sampled greedily).
        top_k: [B] int; <= 0 (or >= V) keeps all.
        top_p: [B] in (0, 1]; keeps the smallest set of most likely tokens whose mass reaches
            top_p (a token is kept when the mass strictly before it is < top_p); 1 keeps all.
        min_p: [B] in [0, 1]; keeps tokens with prob >= min_p * max prob; 0 keeps all.
        do_top_k, do_top_p, do_min_p: host-side hints that let the eager path skip work when no
            row uses a filter (all True is always correct; a CUDA graph should leave them True).
    The most likely token always survives. Ties keep the lowest token id first.
    """
    t = torch.where(temperature < GREEDY_EPS, torch.ones_like(temperature), temperature)
    logits = logits / t.to(logits.dtype)[:, None]
    if not (do_top_k or do_top_p or do_min_p):
        return logits
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True, stable=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if do_top_k:
        ranks = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k)
        remove |= ranks[None, :] >= k[:, None]
    if do_top_p:
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        p = top_p.to(probs.dtype)[:, None]
        remove |= (mass_before >= p) & (p < 1)
    if do_min_p:
        threshold = sorted_logits[:, :1] + torch.log(min_p.to(logits.dtype))[:, None]
        remove |= sorted_logits < threshold
    remove[:, 0] = False
    mask = torch.empty_like(remove).scatter_(1, sorted_idx, remove)
    return logits.masked_fill(mask, float("-inf"))


# --------------------------------------------------------------------------- noise
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _STEP_MUL = _signed(0x9E3779B97F4A7C15), _signed(0xD1B54A32D192ED03)
_MIX1, _MIX2 = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53)


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 bits (`>>` on int64 is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def counter_exponential_noise(seeds: Tensor, steps: Tensor, vocab_size: int) -> Tensor:
    """[B, V] Exp(1) noise that is a pure function of (seed, step, token id).

    A counter-based generator (murmur3's 64-bit finalizer over a Weyl sequence): row b's noise
    depends only on its request's seed and its step number, never on other rows, on batch order or
    on how many draws came before; it needs no host sync and no RNG state, so a CUDA graph can run
    it on static buffers, and CPU and GPU draw the same values. int64 multiplies wrap (two's
    complement), which is what the hash needs.

    Args:
        seeds: [B] int64 per-request seeds; steps: [B] int64 per-request step counters.
    """
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = (seeds.to(torch.int64)[:, None] * _GOLDEN + steps.to(torch.int64)[:, None] * _STEP_MUL) ^ cols[None, :]
    x = x * _GOLDEN
    x = (x ^ _shr(x, 33)) * _MIX1
    x = (x ^ _shr(x, 33)) * _MIX2
    x = x ^ _shr(x, 33)
    u = (_shr(x, 40).to(torch.float32) + 0.5) * (2.0 ** -24)  # 24 bits -> (0, 1), never 0 or 1
    return -torch.log(u)


def resolve_seed(seed: int | None) -> int:
    """The request's seed, or a fresh random one (so unseeded requests still differ)."""
    if seed is not None:
        return int(seed) & ((1 << 63) - 1)
    return int(torch.randint(0, 2**62, (1,)).item())


def sample(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    min_p: Tensor,
    noise: Tensor,
    *,
    do_top_k: bool = True,
    do_top_p: bool = True,
    do_min_p: bool = True,
) -> Tensor:
    """Pick one token per row; greedy where temperature < ``GREEDY_EPS``.

    Args:
        logits: [B, V] fp32, already penalized (see ``apply_penalties``).
        temperature, top_p, min_p: [B] float; top_k: [B] int (see
            ``apply_temperature_topk_topp_minp``).
        noise: [B, V] Exp(1) noise, e.g. from ``counter_exponential_noise``.
        do_top_k, do_top_p, do_min_p: skip hints, see ``apply_temperature_topk_topp_minp``.
    Returns:
        [B] int64 token ids.
    """
    greedy = logits.argmax(dim=-1)
    filtered = apply_temperature_topk_topp_minp(
        logits, temperature, top_k, top_p, min_p, do_top_k=do_top_k, do_top_p=do_top_p, do_min_p=do_min_p
    )
    probs = filtered.softmax(dim=-1)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(temperature < GREEDY_EPS, greedy, sampled)


# --------------------------------------------------------------------------- batch params
@dataclass
class SamplingTensors:
    """Per-row sampling parameters of a batch as [B] tensors, plus host-side skip hints.

    Build once per batch composition and reuse across decode steps. Each request keeps one seed for
    its whole life: pass the requests' resolved seeds when the batch changes (``from_params``
    without ``seeds`` resolves them from the params, drawing random ones for unseeded requests).
    """

    temperature: Tensor  # [B] fp32
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] fp32
    min_p: Tensor  # [B] fp32
    repetition_penalty: Tensor  # [B] fp32
    presence_penalty: Tensor  # [B] fp32
    frequency_penalty: Tensor  # [B] fp32
    seeds: Tensor  # [B] int64
    all_greedy: bool
    do_top_k: bool
    do_top_p: bool
    do_min_p: bool
    do_penalties: bool

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        vocab_size: int,
        device: torch.device | str,
        seeds: Sequence[int] | None = None,
    ) -> SamplingTensors:
        """Stack ``params`` into [B] tensors on ``device``; top_k -1 and >= vocab_size become 0."""
        if seeds is None:
            seeds = [resolve_seed(p.seed) for p in params]
        elif len(seeds) != len(params):
            raise ValueError(f"got {len(seeds)} seeds for {len(params)} params")
        top_k = [0 if p.top_k < 0 or p.top_k >= vocab_size else p.top_k for p in params]

        def f32(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        sampled = [p for p in params if not p.is_greedy]
        return cls(
            temperature=f32([p.temperature for p in params]),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=f32([p.top_p for p in params]),
            min_p=f32([p.min_p for p in params]),
            repetition_penalty=f32([p.repetition_penalty for p in params]),
            presence_penalty=f32([p.presence_penalty for p in params]),
            frequency_penalty=f32([p.frequency_penalty for p in params]),
            seeds=torch.tensor(list(seeds), dtype=torch.int64, device=device),
            all_greedy=not sampled,
            do_top_k=any(0 < k for k, p in zip(top_k, params) if not p.is_greedy),
            do_top_p=any(p.top_p < 1.0 for p in sampled),
            do_min_p=any(p.min_p > 0.0 for p in sampled),
            do_penalties=any(p.has_penalties for p in params),
        )


def sample_tokens(
    logits: Tensor,
    st: SamplingTensors,
    steps: Tensor,
    token_counts: Tensor | None = None,
    prompt_mask: Tensor | None = None,
) -> Tensor:
    """Eager convenience: penalties (when any row has them) then ``sample``.

    Args:
        logits: [B, V] fp32.
        st: the batch's ``SamplingTensors``.
        steps: [B] int64, how many tokens each row's request has generated so far.
        token_counts: [B, V] generated-token counts; needed when ``st.do_penalties``.
        prompt_mask: [B, V] bool prompt tokens (for the repetition penalty), or None.
    Returns:
        [B] int64 token ids.
    """
    if st.do_penalties:
        if token_counts is None:
            raise ValueError("token_counts is required when a row uses repetition/presence/frequency penalties")
        logits = apply_penalties(
            logits, token_counts, prompt_mask, st.repetition_penalty, st.presence_penalty, st.frequency_penalty
        )
    if st.all_greedy:
        return logits.argmax(dim=-1)
    return sample(
        logits,
        st.temperature,
        st.top_k,
        st.top_p,
        st.min_p,
        counter_exponential_noise(st.seeds, steps, logits.shape[-1]),
        do_top_k=st.do_top_k,
        do_top_p=st.do_top_p,
        do_min_p=st.do_min_p,
    )


def token_logprobs(logits: Tensor, tokens: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probabilities of the model's distribution (before penalties and filters, as OpenAI and
    vLLM report them): the chosen tokens' [B], and the top-k values [B, k] and ids [B, k]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
    return logp.gather(1, tokens.view(-1, 1)).squeeze(1), top_vals, top_ids
