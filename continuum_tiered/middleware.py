"""ASGI middleware for ``vllm serve --middleware``: reject malformed hints with HTTP 400.

Without it, malformed hints reach the engine, where the connector logs and ignores them;
with it, the client learns which field is wrong. It is plain ASGI (no vLLM import) so it
wraps any OpenAI-compatible app, and it buffers only POST bodies under ``/v1/``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from continuum_tiered.hints import HintError, parse_hints

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def hint_error_of(body: bytes) -> HintError | None:
    """The hint error in a JSON request body, if any. Bodies that are not JSON objects
    are left for the server to reject in its own words."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    try:
        parse_hints(payload.get("kv_transfer_params"))
    except HintError as err:
        return err
    return None


class HintValidationMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if (error := hint_error_of(body)) is not None:
            await _send_bad_request(send, error)
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (disconnect events)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_bad_request(send: Send, error: HintError) -> None:
    param = error.field
    if not param.startswith("kv_transfer_params"):
        param = f"kv_transfer_params.{param}"
    payload = json.dumps(
        {
            "error": {
                "message": f"invalid kv_transfer_params: {error}",
                "type": "BadRequestError",
                "param": param,
                "code": 400,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
