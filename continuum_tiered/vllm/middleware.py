"""ASGI middlewares for ``vllm serve --middleware``: hostile bodies and malformed hints get
HTTP 400, and (optionally) program ids are scoped per API key.

- :class:`HintValidationMiddleware`: a body nested too deep or with a non-JSON number, and
  malformed hints, get HTTP 400 naming the problem (:mod:`continuum_tiered.core.request_body`).
  Without it, malformed hints reach the engine, where the connector logs and ignores them.
- :class:`ProgramScopeMiddleware`: the same, and each hint's ``program_id`` is rewritten
  into the scope of the request's API key (:mod:`continuum_tiered.core.tenancy`), so that no
  client can end or take over another key's program. ``continuum-tiered serve
  --scope-programs api-key`` passes this one.

Both are plain ASGI (no vLLM import), so they wrap any OpenAI-compatible app. They buffer
the bodies of POST, PUT and PATCH requests on every path (vLLM takes hints on several:
``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``, ``/inference/v1/generate``
...); bodies that are not JSON objects go on untouched, for the app to answer.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from continuum_tiered.core.hints import HintError
from continuum_tiered.core.request_body import (
    BodyError,
    bad_request_body,
    check_body_hints,
    load_json_object,
)
from continuum_tiered.core.tenancy import api_key_scope, scope_hints

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class HintValidationMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        try:
            payload = load_json_object(body)
            if payload is not None:
                check_body_hints(payload)
        except (BodyError, HintError) as error:
            await _send_bad_request(send, error)
            return
        if payload is not None:
            scope, body = self.rewrite(scope, payload, body)
        await self.app(scope, _replay(body, receive), send)

    def rewrite(self, scope: Scope, payload: dict[str, object], body: bytes) -> tuple[Scope, bytes]:
        """The request to pass on, given its checked JSON object; as it came here."""
        return scope, body


class ProgramScopeMiddleware(HintValidationMiddleware):
    """:class:`HintValidationMiddleware` that also scopes program ids per API key."""

    def rewrite(self, scope: Scope, payload: dict[str, object], body: bytes) -> tuple[Scope, bytes]:
        if not scope_hints(payload, api_key_scope(_header(scope, b"authorization"))):
            return scope, body
        body = json.dumps(payload).encode()
        # The new body goes as one message of a known length, however the old one came.
        stale = (b"content-length", b"transfer-encoding")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in stale]
        headers.append((b"content-length", str(len(body)).encode()))
        return {**scope, "headers": headers}, body


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


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


async def _send_bad_request(send: Send, error: BodyError | HintError) -> None:
    payload = bad_request_body(error)
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
