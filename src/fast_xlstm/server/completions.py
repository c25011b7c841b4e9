"""`/v1/completions`: prompts (text or token ids, one or a list) -> choices, whole or streamed."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..tokenizer import Tokenizer
from .errors import APIError
from .protocol import CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse
from .serving import (
    ServingContext,
    check_common,
    check_logprobs,
    check_token_ids,
    collect,
    resolve_max_tokens,
    sampling_params,
    streamed,
    submit,
    usage,
)
from .stream import Delta, RequestStream, SubRequest


def _prompts(req: CompletionRequest, ctx: ServingContext) -> list[list[int]]:
    """The request's prompts as token ids (text gets BOS, as in offline generation)."""
    p = req.prompt
    if isinstance(p, str):
        raw: list[str | list[int]] = [p]
    elif p and isinstance(p[0], int):
        raw = [p]  # one prompt of token ids
    else:
        raw = list(p)
    if not raw:
        raise APIError("prompt must not be empty", param="prompt")
    out = []
    for j, item in enumerate(raw):
        if isinstance(item, str):
            if not item:
                raise APIError(f"prompt {j} is an empty string", param="prompt")
            out.append(ctx.tokenizer.encode(item))
        else:
            if not item:
                raise APIError(f"prompt {j} has no tokens", param="prompt")
            check_token_ids(item, ctx.vocab_size, "prompt")
            out.append(list(item))
    return out


def _logprobs(tok: Tokenizer, token_ids: list[int], logprobs: list[float] | None,
              alternatives: list[dict[int, float]] | None, offset: int) -> tuple[CompletionLogprobs | None, int]:
    """The legacy completions logprobs object for `token_ids`, with text offsets from `offset`."""
    if logprobs is None:
        return None, offset
    out = CompletionLogprobs()
    for tid, lp, alts in zip(token_ids, logprobs, alternatives or [{}] * len(token_ids)):
        text = tok.decode([tid])
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        top: dict[str, float] = {}
        for a, v in alts.items():  # best first; tokens that decode alike keep the best value
            top.setdefault(tok.decode([a]), v)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out, offset


async def create_completion(req: CompletionRequest, ctx: ServingContext, request: Request) -> Response:
    arrival = time.monotonic()  # time to first token counts from here, tokenization included
    check_common(req, ctx)
    for name in ("echo", "suffix"):
        if getattr(req, name):
            raise APIError(f"{name} is not supported", param=name)
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of other than n is not supported", param="best_of")
    check_logprobs(req.logprobs, "logprobs")
    prompts = _prompts(req, ctx)
    subs = []
    for ids in prompts:
        max_tokens = resolve_max_tokens(req.max_tokens, len(ids), ctx, default=ctx.config.default_max_tokens,
                                        param="max_tokens", prompt_param="prompt")
        for i in range(req.n):
            params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, choice=i, param_names={})
            subs.append(SubRequest(ids, params, req.session_id if i == 0 else None))
    rid = ctx.new_id("cmpl")
    stream = await submit(ctx, subs, rid, "prompt", arrival)
    if req.stream:
        return streamed(req, ctx, stream, lambda include_usage: _chunks(req, ctx, stream, rid, include_usage))
    choices = await collect(ctx, stream, request)
    resp = CompletionResponse(id=rid, model=req.model, usage=usage(choices, req.n), choices=[
        CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason,
                         logprobs=_logprobs(ctx.tokenizer, c.token_ids or [], c.logprobs, c.top_logprobs, 0)[0])
        for i, c in sorted(choices.items())])
    return JSONResponse(resp.model_dump())


async def _chunks(req: CompletionRequest, ctx: ServingContext, stream: RequestStream, rid: str,
                  include_usage: bool) -> AsyncIterator[CompletionChunk]:
    """OpenAI's completion stream: text chunks per choice, then a chunk with the finish reason and
    empty text, then (when asked) one chunk with no choices and the usage."""
    created = int(time.time())
    offsets: dict[int, int] = {}
    last: dict[int, Delta] = {}

    def chunk(choice: CompletionChoice) -> CompletionChunk:
        return CompletionChunk(id=rid, created=created, model=req.model, choices=[choice])

    async for d in stream:
        if d.text or d.logprobs is not None:
            lp, offsets[d.index] = _logprobs(ctx.tokenizer, d.token_ids, d.logprobs, d.top_logprobs,
                                             offsets.get(d.index, 0))
            yield chunk(CompletionChoice(index=d.index, text=d.text, logprobs=lp))
        if d.finished:
            last[d.index] = d
            yield chunk(CompletionChoice(index=d.index, text="", finish_reason=d.finish_reason))
    if include_usage:
        yield CompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage(last, req.n))
