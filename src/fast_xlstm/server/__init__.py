"""OpenAI-compatible HTTP server over the continuous-batching engine.

`protocol` (request/response models), `chat_template` (messages -> prompt ids), `async_engine` (the
engine in one background thread, streamed to asyncio), `completions`/`chat` (request -> engine ->
response or SSE chunks) and `serving` (what they share), `metrics` (Prometheus), `errors` (OpenAI
error bodies), `limits` (body size), `config` (`ServerConfig`), `api` (the FastAPI app: routes, key
check, lifespan), `cli` (`fast-xlstm serve`). See docs/server.md.

Import `fast_xlstm.server.api.create_app` for the app; this package's `__init__` imports nothing so
`fast-xlstm` commands work without the `serve` extra installed.
"""
