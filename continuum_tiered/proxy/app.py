"""The proxy's ASGI app: program priority and hints on completions, everything else as is.

``POST /v1/completions`` and ``POST /v1/chat/completions`` bodies get ``priority`` (the
program's first arrival in ms) and ``kv_transfer_params.continuum`` hints (program id,
per-program turn counter, ``last_turn`` from the ``X-Program-Last-Turn: true`` header)
before they go upstream; see :mod:`continuum_tiered.proxy.programs` for how a request's
program is found. Every other request, and every response, passes through byte for byte:
responses are relayed chunk by chunk as the upstream sends them (so server-sent events
stream), with the upstream's status and headers. A client that disconnects closes the
upstream request, so vLLM aborts it, as it would for the client itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from continuum_tiered.client import program_priority
from continuum_tiered.hints import HINTS_KEY, ProgramHints
from continuum_tiered.proxy.programs import (
    DEFAULT_PROGRAM_HEADER,
    ProgramRegistry,
    program_identity,
)

REWRITTEN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
LAST_TURN_HEADER = "X-Program-Last-Turn"
# Hop-by-hop headers (RFC 9110, 7.6.1) belong to one connection; the proxy also sets
# Host and Content-Length itself, since it may change the body.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"host", "content-length"}


@dataclass(frozen=True)
class ProxyOptions:
    program_header: str = DEFAULT_PROGRAM_HEADER
    idle_timeout_s: float = 600.0
    max_programs: int = 100_000
    connect_timeout_s: float = 10.0


def add_program_fields(
    body: bytes,
    headers: Mapping[str, str],
    programs: ProgramRegistry,
    program_header: str,
    now_s: float,
) -> bytes:
    """The body to send upstream for a completion request that arrived at ``now_s``.

    Unchanged when it is not a JSON object (the upstream answers it in its own words) or
    already has ``priority`` or continuum hints (the client knows its program better).
    A request without a program identity gets only ``priority`` = its own arrival: it is
    a one-turn program whose KV the upstream frees as usual.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if not isinstance(payload, dict) or "priority" in payload:
        return body
    params = payload.get("kv_transfer_params")
    if params is not None and (not isinstance(params, dict) or HINTS_KEY in params):
        return body
    program_id = program_identity(headers, payload, program_header)
    if program_id is None:
        payload["priority"] = program_priority(now_s)
    else:
        last_turn = headers.get(LAST_TURN_HEADER, "").strip().lower() == "true"
        first_arrival_s, turn = programs.next_turn(program_id, now_s, last_turn)
        hints = ProgramHints(program_id, turn, last_turn=last_turn)
        payload["priority"] = program_priority(first_arrival_s)
        payload["kv_transfer_params"] = {**(params or {}), **hints.to_params()}
    return json.dumps(payload).encode()


class ProxyEndpoint:
    """The ASGI endpoint behind every path."""

    def __init__(self, upstream: str, options: ProxyOptions) -> None:
        self.upstream = upstream.rstrip("/")
        self.options = options
        self.programs = ProgramRegistry(options.idle_timeout_s, options.max_programs)
        self.client = httpx.AsyncClient(
            # No read timeout: a long generation is not a fault; the client's own timeout
            # (a disconnect) ends it.
            timeout=httpx.Timeout(None, connect=options.connect_timeout_s),
            # As many concurrent requests as agents send; the upstream queues them.
            limits=httpx.Limits(max_connections=None),
            # Relayed bytes are as the upstream encoded them: ask for an encoding only
            # when the client did (its own header replaces this default).
            headers={"accept-encoding": "identity"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        if request.method == "POST" and request.url.path in REWRITTEN_PATHS:
            body = add_program_fields(
                body, request.headers, self.programs, self.options.program_header, time.time()
            )
        upstream_request = self.client.build_request(
            request.method,
            httpx.URL(self.upstream + request.url.path, query=request.url.query.encode()),
            headers=[(k, v) for k, v in request.headers.raw if k.decode() not in _NOT_FORWARDED],
            content=body,
        )
        async with anyio.create_task_group() as group:
            group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
            await self._relay(upstream_request, send)
            group.cancel_scope.cancel()

    async def _relay(self, upstream_request: httpx.Request, send: Send) -> None:
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as err:
            await _send_bad_gateway(send, self.upstream, err)
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.lower(), v)
                        for k, v in response.headers.raw
                        if k.lower().decode() not in _HOP_BY_HOP
                    ],
                }
            )
            # Raw bytes: any content-encoding and content-length stay valid as they are.
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):  # close the upstream even when cancelled
                await response.aclose()


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _send_bad_gateway(send: Send, upstream: str, err: httpx.TransportError) -> None:
    payload = json.dumps(
        {
            "error": {
                "message": f"upstream {upstream} unreachable: {type(err).__name__}: {err}",
                "type": "BadGatewayError",
                "param": None,
                "code": 502,
            }
        }
    ).encode()
    headers = Headers({"content-type": "application/json", "content-length": str(len(payload))})
    await send({"type": "http.response.start", "status": 502, "headers": headers.raw})
    await send({"type": "http.response.body", "body": payload})


def create_app(upstream: str, options: ProxyOptions | None = None) -> Starlette:
    """The proxy in front of the OpenAI server at ``upstream`` (e.g. ``http://host:8000``)."""
    endpoint = ProxyEndpoint(upstream, options or ProxyOptions())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await endpoint.client.aclose()

    return Starlette(routes=[Route("/{path:path}", endpoint)], lifespan=lifespan)
