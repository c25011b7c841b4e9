"""The FastAPI app: routes, API-key check, body-size limit, lifespan. HTTP only; the work is in
`completions`, `chat`, `async_engine`."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..engine import LLMEngine
from ..tokenizer import Tokenizer
from .async_engine import AsyncEngine
from .chat import create_chat_completion
from .chat_template import ChatFormatter
from .completions import create_completion
from .config import ServerConfig
from .errors import APIError, install_error_handlers
from .limits import BodySizeLimit
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .serving import ServingContext

logger = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False)


async def check_api_key(request: Request,
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """401 unless the request carries the configured key (a no-op when none is configured)."""
    key = request.app.state.ctx.config.api_key
    if key is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), key.encode()):
        what = "missing API key" if credentials is None else "incorrect API key provided"
        raise APIError(f"{what}: send 'Authorization: Bearer <key>'", status=401, code="invalid_api_key")


def create_app(engine: LLMEngine, tokenizer: Tokenizer, config: ServerConfig) -> FastAPI:
    """An app serving `engine`; the engine thread starts and stops with the app's lifespan."""
    metrics = ServerMetrics()
    front = AsyncEngine(engine, metrics)
    ctx = ServingContext(front, tokenizer, ChatFormatter(tokenizer), config, engine.model.config.vocab_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        front.start()
        yield
        # Uvicorn has stopped accepting and waited --shutdown-timeout for running requests.
        aborted = await front.stop()
        logger.info("engine stopped (%d unfinished requests aborted)", aborted)

    app = FastAPI(title="fast-xlstm", summary="OpenAI-compatible xLSTM server", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=config.max_request_bytes)
    app.state.ctx = ctx
    app.state.metrics = metrics
    install_error_handlers(app)
    @app.get("/health")
    async def health() -> Response:
        if not front.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    def card(name: str) -> ModelCard:
        return ModelCard(id=name, max_model_len=config.max_model_len)

    @v1.get("/models")
    async def list_models() -> ModelList:
        return ModelList(data=[card(n) for n in config.model_names])

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        if model not in config.model_names:
            raise APIError(f"The model `{model}` does not exist", status=404, param="model", code="model_not_found")
        return card(model)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(body, ctx, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(body, ctx, request)

    app.include_router(v1)
    return app
