"""`/v1/chat/completions`: messages -> the assistant's reply, whole or streamed.

`session_id` (an extension field) is handed to the engine with the first choice, which keeps that
conversation's final state so the next turn prefills only its new message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..tokenizer import Tokenizer
from .chat_template import ChatTemplateError
from .errors import APIError
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
)
from .serving import (
    ServingContext,
    check_common,
    check_logprobs,
    collect,
    resolve_max_tokens,
    sampling_params,
    streamed,
    submit,
    usage,
)
from .stream import Delta, RequestStream, SubRequest


def _logprobs(tok: Tokenizer, token_ids: list[int], logprobs: list[float] | None,
              alternatives: list[dict[int, float]] | None) -> ChatLogprobs | None:
    if logprobs is None:
        return None

    def entry(tid: int, lp: float) -> TopLogprob:
        text = tok.decode([tid])
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

    content = []
    for tid, lp, alts in zip(token_ids, logprobs, alternatives or [{}] * len(token_ids)):
        e = entry(tid, lp)
        content.append(ChatTokenLogprob(**e.model_dump(), top_logprobs=[entry(a, v) for a, v in alts.items()]))
    return ChatLogprobs(content=content)


def _check(req: ChatCompletionRequest) -> int | None:
    """Fields this server does not implement; returns the top logprobs to ask the engine for."""
    if req.tools:
        raise APIError("tools are not supported", param="tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(f"response_format {req.response_format.type!r} is not supported", param="response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
    check_logprobs(req.top_logprobs, "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(req: ChatCompletionRequest, ctx: ServingContext, request: Request) -> Response:
    arrival = time.monotonic()  # time to first token counts from here, tokenization included
    check_common(req, ctx)
    top_k = _check(req)
    try:
        ids = ctx.chat.encode([{"role": m.role, "content": m.text()} for m in req.messages],
                              add_generation_prompt=req.add_generation_prompt)
    except ChatTemplateError as e:
        raise APIError(str(e), param="messages") from e
    requested, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens is not None
                        else (req.max_tokens, "max_tokens"))
    max_tokens = resolve_max_tokens(requested, len(ids), ctx, default=ctx.config.default_max_tokens, param=param,
                                    prompt_param="messages")
    names = {"max_tokens": param, "logprobs": "top_logprobs"}
    subs = [SubRequest(ids, sampling_params(req, max_tokens=max_tokens, logprobs=top_k, choice=i, param_names=names),
                       req.session_id if i == 0 else None)
            for i in range(req.n)]
    rid = ctx.new_id("chatcmpl")
    stream = await submit(ctx, subs, rid, "messages", arrival)
    if req.stream:
        return streamed(req, ctx, stream, lambda include_usage: _chunks(req, ctx, stream, rid, include_usage))
    choices = await collect(ctx, stream, request)
    resp = ChatCompletionResponse(id=rid, model=req.model, usage=usage(choices, req.n), choices=[
        ChatChoice(index=i, message=ChatResponseMessage(content=c.text), finish_reason=c.finish_reason,
                   logprobs=_logprobs(ctx.tokenizer, c.token_ids or [], c.logprobs, c.top_logprobs))
        for i, c in sorted(choices.items())])
    return JSONResponse(resp.model_dump())


async def _chunks(req: ChatCompletionRequest, ctx: ServingContext, stream: RequestStream, rid: str,
                  include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    """OpenAI's chat stream: per choice a first chunk with the role, content chunks, a last chunk
    with an empty delta and the finish reason; then (when asked) a usage chunk with no choices."""
    created = int(time.time())
    last: dict[int, Delta] = {}

    def chunk(choice: ChatChunkChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice])

    for i in range(req.n):
        yield chunk(ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content="")))
    async for d in stream:
        if d.text or d.logprobs is not None:
            lp = _logprobs(ctx.tokenizer, d.token_ids, d.logprobs, d.top_logprobs)
            yield chunk(ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text), logprobs=lp))
        if d.finished:
            last[d.index] = d
            yield chunk(ChatChunkChoice(index=d.index, delta=ChatDelta(), finish_reason=d.finish_reason))
    if include_usage:
        yield ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage(last, req.n))
