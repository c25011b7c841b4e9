"""Request body size limit that answers with the OpenAI error body.

FastAPI's own `max_body_size` (Starlette's RequestBodyLimitMiddleware) answers a declared-too-large
body with a plain-text 413 that replaces whatever the app sends, and OpenAI clients expect the JSON
error body; so this small ASGI layer does the same two checks and lets the app's error handlers
write the answer: a `Content-Length` over the limit is refused before the body is read, and a body
without one (chunked) is counted as it arrives.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class BodySizeLimit:
    """ASGI middleware: HTTP request bodies of more than `max_bytes` get a 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: int | None) -> str:
        what = f"{size} bytes" if size is not None else f"more than {self.max_bytes} bytes"
        return f"request body too large: {what} (the limit is {self.max_bytes} bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(413, self._message(int(declared)), code="request_too_large")
            await response(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI re-raises HTTPExceptions met while reading the body
                    raise HTTPException(413, self._message(None))
            return message

        await self.app(scope, counted_receive, send)
