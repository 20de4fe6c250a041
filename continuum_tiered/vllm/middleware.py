"""ASGI middlewares for ``vllm serve --middleware``: hostile bodies and malformed hints get
HTTP 400, (optionally) program ids are scoped per API key, and (optionally) requests that
name no program get one from their conversation.

- :class:`HintValidationMiddleware`: a body nested too deep or with a non-JSON number, and
  malformed hints, get HTTP 400 naming the problem (:mod:`continuum_tiered.core.request_body`).
  Without it, malformed hints reach the engine, where the connector logs and ignores them.
- :class:`ProgramScopeMiddleware`: the same, and each hint's ``program_id`` is rewritten
  into the scope of the request's API key (:mod:`continuum_tiered.core.tenancy`), so that no
  client can end or take over another key's program. ``continuum-tiered serve
  --scope-programs api-key --program-identity explicit`` passes this one.
- :class:`ProgramIdentityMiddleware` (``continuum-tiered serve``'s default) and
  :class:`ScopedProgramIdentityMiddleware` (with ``--scope-programs api-key``): checked as
  above, then a completion that carries no hints gets its program, priority and hints
  from :mod:`continuum_tiered.core.program_tagging`, the proxy's code: from a program
  header, the body's ``user`` or a session header, else from its conversation, so an
  unmodified agent pointed at the server runs as one program. The response streams
  through unchanged and is read for the reply the next turn will extend. The index lives
  in the API server process: with ``--api-server-count`` above 1 (or several replicas),
  put ``continuum-tiered proxy`` in front instead.

Both are plain ASGI (no vLLM import), so they wrap any OpenAI-compatible app. They buffer
the bodies of POST, PUT and PATCH requests on every path (vLLM takes hints on several:
``/v1/completions``, ``/v1/chat/completions``, ``/v1/responses``, ``/inference/v1/generate``
...); bodies that are not JSON objects go on untouched, for the app to answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar

from starlette.datastructures import Headers

from continuum_tiered.core.hints import HintError
from continuum_tiered.core.program_tagging import (
    COMPLETION_PATHS,
    OpenTurn,
    ProgramTagger,
    ResponseWatch,
    TaggingOptions,
)
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
        if payload is None:
            await self.app(scope, _replay(body, receive), send)
        else:
            await self.forward(scope, payload, body, receive, send)

    async def forward(
        self, scope: Scope, payload: dict[str, object], body: bytes, receive: Receive, send: Send
    ) -> None:
        """Send the checked request on, rewritten."""
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
        return _with_length(scope, body), body


class ProgramIdentityMiddleware(HintValidationMiddleware):
    """:class:`HintValidationMiddleware` that gives completions their program."""

    # The server has always taken a client's own priority (the client helper sends its
    # program's); the proxy is the place to distrust it.
    tagging: ClassVar[TaggingOptions] = TaggingOptions(
        scope_programs=False, trust_client_priority=True
    )

    def __init__(self, app: ASGIApp):
        super().__init__(app)
        self.tagger = ProgramTagger(self.tagging)

    async def forward(
        self, scope: Scope, payload: dict[str, object], body: bytes, receive: Receive, send: Send
    ) -> None:
        completion = scope["method"] == "POST" and scope.get("path") in COMPLETION_PATHS
        tagged = self.tagger.tag_payload(
            payload, body, Headers(scope=scope), time.time(), completion
        )
        if tagged.body is not body:
            scope = _with_length(scope, tagged.body)
        if tagged.open_turn is None:
            await self.app(scope, _replay(tagged.body, receive), send)
            return
        await self._answer_turn(tagged.open_turn, scope, _replay(tagged.body, receive), send)

    async def _answer_turn(
        self, turn: OpenTurn, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Pass the response on as it streams, reading the reply the next turn extends."""
        watch = ResponseWatch(self.tagger, turn)

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                watch.status(message["status"])
            elif message["type"] == "http.response.body":
                watch.body(message.get("body", b""), last=not message.get("more_body", False))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            watch.end()


class ScopedProgramIdentityMiddleware(ProgramIdentityMiddleware):
    """:class:`ProgramIdentityMiddleware` with program ids scoped per API key."""

    tagging: ClassVar[TaggingOptions] = TaggingOptions(
        scope_programs=True, trust_client_priority=True
    )


def _with_length(scope: Scope, body: bytes) -> Scope:
    """``scope`` for ``body`` sent as one message of a known length, however the old came."""
    stale = (b"content-length", b"transfer-encoding")
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in stale]
    headers.append((b"content-length", str(len(body)).encode()))
    return {**scope, "headers": headers}


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
