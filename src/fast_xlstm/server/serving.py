"""What completions and chat completions share: request checks, sampling settings, running the
engine requests to the end (watching for a client that leaves) and streaming them as SSE."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from ..engine.runner import LOGPROBS_K
from ..generation.params import SamplingParams
from ..tokenizer import Tokenizer
from .async_engine import AsyncEngine
from .chat_template import ChatFormatter
from .config import ServerConfig
from .errors import APIError
from .protocol import ErrorBody, ErrorResponse, PromptTokensDetails, SamplingFields, Usage
from .stream import Delta, EngineDeadError, RequestStream, SubRequest


@dataclass
class ServingContext:
    """Everything a route needs: the engine front, the tokenizer, the chat formatter, the settings."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    chat: ChatFormatter
    config: ServerConfig
    vocab_size: int

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"


# ---- checks ----------------------------------------------------------------------------------------

def check_common(req: SamplingFields, ctx: ServingContext) -> None:
    """Model name, `n`, and the OpenAI fields this server does not implement (a 400, not silence)."""
    if req.model not in ctx.config.model_names:
        raise APIError(f"The model `{req.model}` does not exist. Available: {', '.join(ctx.config.model_names)}",
                       status=404, param="model", code="model_not_found")
    if not 1 <= req.n <= ctx.config.max_n:
        raise APIError(f"n must be in [1, {ctx.config.max_n}], got {req.n}", param="n")
    if req.logit_bias:
        raise APIError("logit_bias is not supported", param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed with stream=true", param="stream_options")


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"{param} has token ids outside [0, {vocab_size}): {bad[:5]}", param=param)


def resolve_max_tokens(requested: int | None, prompt_len: int, ctx: ServingContext, *, default: int,
                       param: str, prompt_param: str) -> int:
    """The tokens to generate: `requested`, or `default` capped by what `max_model_len` leaves."""
    limit = ctx.config.max_model_len
    if prompt_len >= limit:
        raise APIError(f"the prompt is {prompt_len} tokens; the maximum model length is {limit} tokens "
                       f"(prompt plus at least one generated token)", param=prompt_param,
                       code="context_length_exceeded")
    room = limit - prompt_len
    if requested is None:
        return min(default, room)
    if requested < 1:
        raise APIError(f"{param} must be >= 1, got {requested}", param=param)
    if requested > room:
        raise APIError(f"{param} is {requested} but the prompt has {prompt_len} tokens and the maximum model "
                       f"length is {limit}: at most {room} tokens can be generated", param=param,
                       code="context_length_exceeded")
    return requested


def check_logprobs(k: int | None, param: str) -> None:
    if k is not None and not 0 <= k <= LOGPROBS_K:
        raise APIError(f"{param} must be in [0, {LOGPROBS_K}], got {k}", param=param)


def sampling_params(req: SamplingFields, *, max_tokens: int, logprobs: int | None, choice: int,
                    param_names: dict[str, str]) -> SamplingParams:
    """SamplingParams of choice `choice` (its seed is `seed + choice`, so `n` seeded choices differ).

    SamplingParams validates ranges; its ValueError starts with the field's name, which becomes the
    400's `param` (renamed through `param_names` where the API calls it differently).
    """
    try:
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=0.0 if req.presence_penalty is None else req.presence_penalty,
            frequency_penalty=0.0 if req.frequency_penalty is None else req.frequency_penalty,
            seed=None if req.seed is None else req.seed + choice,
            max_tokens=max_tokens,
            stop=req.stop or [],
            stop_token_ids=req.stop_token_ids or [],
            include_stop_str_in_output=req.include_stop_str_in_output,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as e:
        field = str(e).split(" ", 1)[0]
        param = param_names.get(field, field)
        message = str(e) if param == field else f"{param}{str(e)[len(field):]}"
        raise APIError(message, param=param) from e


async def submit(ctx: ServingContext, subrequests: list[SubRequest], request_id: str, prompt_param: str,
                 arrival: float) -> RequestStream:
    """Hands the engine requests over (`arrival`: when the HTTP request came, `time.monotonic()`,
    which time to first token counts from); the engine's own validation errors become 400s."""
    try:
        return await ctx.engine.submit(subrequests, request_id=request_id, arrival=arrival)
    except ValueError as e:
        raise APIError(str(e), param=prompt_param) from e
    except EngineDeadError as e:
        raise APIError(str(e), status=503, type="server_error") from e


# ---- results ---------------------------------------------------------------------------------------

@dataclass
class Choice:
    """A finished choice gathered from its deltas."""

    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids = (self.token_ids or []) + d.token_ids
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
            self.top_logprobs = (self.top_logprobs or []) + (d.top_logprobs or [])
        self.finish_reason = d.finish_reason or self.finish_reason
        self.prompt_tokens, self.cached_tokens = d.prompt_tokens, d.cached_tokens

    @property
    def num_generated(self) -> int:
        return len(self.token_ids or [])


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only a disconnect
    message can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(ctx: ServingContext, stream: RequestStream, request: Request) -> dict[int, Choice]:
    """Runs a stream to the end; a client that leaves meanwhile has its requests aborted at once."""
    choices: dict[int, Choice] = defaultdict(Choice)

    async def consume() -> None:
        async for d in stream:
            choices[d.index].add(d)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not consumer.done():
            raise APIError("client disconnected", status=499)
        exc = consumer.exception()
        if isinstance(exc, EngineDeadError):
            raise APIError(str(exc), status=503, type="server_error") from exc
        if exc is not None:
            raise exc
        return choices
    finally:
        consumer.cancel()
        watcher.cancel()
        ctx.engine.abort(stream)  # a no-op when every choice finished


def usage(choices: Mapping[int, Choice | Delta], n: int) -> Usage:
    """Usage from every choice's result (a gathered `Choice` or a stream's final `Delta`); prompt
    tokens count once per prompt (choices `p * n .. p * n + n - 1` share prompt `p`)."""
    firsts = [c for i, c in choices.items() if i % n == 0]
    prompt = sum(c.prompt_tokens for c in firsts)
    completion = sum(c.num_generated for c in choices.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c.cached_tokens for c in firsts)))


def streamed(req, ctx: ServingContext, stream: RequestStream,
             make_events: Callable[[bool], AsyncIterator[BaseModel]]) -> EventSourceResponse:
    """The SSE response of a streaming request (completions or chat): `make_events(include_usage)`
    gives the chunks; usage is sent only when `stream_options.include_usage` asks for it."""
    include_usage = req.stream_options is not None and req.stream_options.include_usage
    return sse_response(ctx, stream, make_events(include_usage), dump=None if include_usage else {"exclude": {"usage"}})


def sse_response(ctx: ServingContext, stream: RequestStream, events: AsyncIterator[BaseModel],
                 dump: dict | None = None) -> EventSourceResponse:
    """Server-Sent Events as OpenAI sends them: `data: <json>` per chunk, then `data: [DONE]`.

    A client that disconnects cancels this generator (Starlette watches the connection); the
    `finally` aborts the unfinished engine requests, which frees their slots at once.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in events:
                yield format_sse_event(data_str=chunk.model_dump_json(**(dump or {})))
        except EngineDeadError as e:  # headers are sent: the error goes in the stream, as vLLM does
            err = ErrorResponse(error=ErrorBody(message=str(e), type="server_error"))
            yield format_sse_event(data_str=err.model_dump_json())
        finally:
            ctx.engine.abort(stream)
        yield format_sse_event(data_str="[DONE]")

    return EventSourceResponse(body())
