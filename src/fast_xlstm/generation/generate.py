"""Eager generation on any device: a static batch of prompts, streamed as text deltas.

Prompts of different lengths are packed into one row with offsets (no pad token ever touches a
state), prefilled in one pass with the head applied to last positions only, then decoded one
token per step for the rows still running. Finished rows leave the batch at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch

from ..model import ModelState, XLSTMForCausalLM
from ..state import concat_states, init_state, select_state
from ..tokenizer import Tokenizer
from .params import SamplingParams
from .sampling import SamplingTensors, add_token_counts_, prompt_mask_from_ids, sample_tokens, token_logprobs
from .tracker import GenerationOutput, RequestTracker, StreamEvent, stop_token_ids

logger = logging.getLogger(__name__)


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"got {len(x)} {name} for {n} prompts")
        return list(x)
    return [x] * n


def encode_prompts(prompts: Sequence[str] | Sequence[Sequence[int]] | str, tokenizer: Tokenizer | None,
                   vocab_size: int) -> list[list[int]]:
    """Strings are tokenized (BOS prepended per the tokenizer); id lists are checked and kept."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]  # type: ignore[list-item]
    if not prompts:
        raise ValueError("no prompts given")
    out = []
    for j, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {j} is empty")
            if tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token id lists otherwise")
            ids = tokenizer.encode(p)
        else:
            ids = list(map(int, p))
            if not ids:
                raise ValueError(f"prompt {j} has no tokens")
        if min(ids) < 0 or max(ids) >= vocab_size:  # (C-speed checks: prompts reach 100k+ ids)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            raise ValueError(f"prompt {j} has token ids outside [0, {vocab_size}): {bad[:5]}")
        out.append(ids)
    return out


@torch.inference_mode()
def prefill(model: XLSTMForCausalLM, prompt_ids: list[list[int]], states: ModelState | None = None, *,
            state_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ModelState]:
    """Runs N prompts packed in one row. Returns last-position logits [N, V] and the N final states."""
    device = model.device
    if states is None:
        states = init_state(model.config, len(prompt_ids), dtype=state_dtype, device=device)
    lengths = torch.tensor([len(p) for p in prompt_ids])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(device)
    packed = torch.tensor([t for p in prompt_ids for t in p], dtype=torch.long, device=device)[None]
    return model(packed, states, cu_seqlens=cu, last_logits_only=True)


def stream_generate(model: XLSTMForCausalLM, tokenizer: Tokenizer | None,
                    prompts: Sequence[str] | Sequence[Sequence[int]] | str,
                    params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                    states: ModelState | None = None, state_dtype: torch.dtype = torch.float32,
                    outputs: list[GenerationOutput] | None = None) -> Iterator[StreamEvent]:
    """Generates for a batch of prompts, yielding one `StreamEvent` per generated token.

    Args:
        prompts: strings (tokenized with BOS) or token id lists; a single string is one prompt.
        params: one `SamplingParams` for all prompts or one per prompt (default: greedy-free defaults).
        states: optional per-prompt starting states (N sequences), e.g. a chat's previous turns.
        outputs: if given, filled with one `GenerationOutput` per prompt (with final states).
    """
    prompt_ids = encode_prompts(prompts, tokenizer, model.config.vocab_size)
    n = len(prompt_ids)
    plist = _as_list(params if params is not None else SamplingParams(), n, "SamplingParams")
    device, vocab = model.device, model.config.vocab_size
    base_stop = stop_token_ids(model.config.stop_token_ids, tokenizer)
    reqs = [RequestTracker(ids, p, tokenizer, set() if p.ignore_eos else base_stop)
            for ids, p in zip(prompt_ids, plist)]
    if outputs is not None:
        outputs[:] = [r.out for r in reqs]

    logits, state = prefill(model, prompt_ids, states, state_dtype=state_dtype)
    active = list(range(n))
    counts = torch.zeros(n, vocab, dtype=torch.int32, device=device)
    prompt_mask = prompt_mask_from_ids(prompt_ids, vocab, device)
    st = SamplingTensors.from_params(plist, vocab, device, seeds=[r.seed for r in reqs])
    with torch.inference_mode():
        while True:
            steps = torch.tensor([len(reqs[j].out.token_ids) for j in active], device=device)
            tokens = sample_tokens(logits, st, steps, counts, prompt_mask)
            add_token_counts_(counts, tokens)
            ks = [reqs[j].params.logprobs for j in active if reqs[j].params.logprobs is not None]
            lps = [t.tolist() for t in token_logprobs(logits, tokens, max(ks))] if ks else None
            keep = []
            for row, (j, tok) in enumerate(zip(active, tokens.tolist())):
                r = reqs[j]
                text = r.accept(tok)
                lp = top = None
                if lps is not None and r.params.logprobs is not None:
                    lp, top = r.add_logprobs(lps[0][row], lps[1][row], lps[2][row])
                if r.out.finish_reason is None:
                    keep.append(row)
                else:
                    r.out.state = select_state(state, [row])
                yield StreamEvent(j, tok, text, r.out.finish_reason, lp, top)
            if not keep:
                return
            if len(keep) < len(active):
                state = select_state(state, keep)
                idx = torch.tensor(keep, device=device)
                tokens, counts, prompt_mask = tokens[idx], counts[idx], prompt_mask[idx]
                active = [active[row] for row in keep]
                st = SamplingTensors.from_params([reqs[j].params for j in active], vocab, device,
                                                 seeds=[reqs[j].seed for j in active])
            logits, state = model.step(tokens, state)


def generate(model: XLSTMForCausalLM, tokenizer: Tokenizer | None,
             prompts: Sequence[str] | Sequence[Sequence[int]] | str,
             params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             states: ModelState | None = None, state_dtype: torch.dtype = torch.float32) -> list[GenerationOutput]:
    """Generates for every prompt and returns the outputs in prompt order (see `stream_generate`)."""
    outputs: list[GenerationOutput] = []
    for _ in stream_generate(model, tokenizer, prompts, params, states=states, state_dtype=state_dtype,
                             outputs=outputs):
        pass
    return outputs


def stream_text(model: XLSTMForCausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int],
                params: SamplingParams | None = None, **kwargs) -> Iterator[str]:
    """Text deltas of a single prompt, each made of whole characters."""
    for event in stream_generate(model, tokenizer, [prompt] if isinstance(prompt, str) else [list(prompt)],
                                 params, **kwargs):
        if event.text:
            yield event.text


__all__ = ["StreamEvent", "GenerationOutput", "encode_prompts", "prefill", "stream_generate", "generate",
           "stream_text", "concat_states"]
