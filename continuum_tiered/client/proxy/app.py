"""The proxy's ASGI app: program priority and hints on completions, everything else as is.

``POST /v1/completions`` and ``POST /v1/chat/completions`` bodies get ``priority`` (the
program's first arrival in ms) and ``kv_transfer_params.continuum`` hints (program id,
per-program turn counter, ``last_turn`` from the ``X-Program-Last-Turn: true`` header)
before they go upstream; :mod:`continuum_tiered.core.program_tagging` (shared with the
server middleware) finds a request's program: the client's hints, a program header, the
body's ``user``, a session header, else the conversation the request extends. A client's
own hints are kept, with their program id scoped as below. The response of a request
whose program came from its conversation is read as it streams by (not changed) for the
reply the program's next turn will extend.
A request of a program goes upstream with the program's routing key in ``X-Session-ID``
(:func:`~continuum_tiered.client.agent_program.routing_key` of the scoped id, replacing any
the client sent), so ``vllm-router --policy consistent_hash`` upstream keeps every turn of
a program on one replica.

Clients do not share programs or choose their place in the queue:

- program ids are scoped per client API key (:mod:`continuum_tiered.core.tenancy`: the
  ``Authorization: Bearer`` key's hash, or ``anonymous``), whether the proxy found the id
  or the client sent it in its own hints, so no client can end or take over another
  key's program (``--scope-programs none``: ids as they are);
- a ``priority`` the client sent is replaced by its program's (or, outside a program, its
  arrival's), on every path, unless ``--trust-client-priority``.

A body nested too deep or holding a non-JSON number gets HTTP 400 from the proxy itself
(:mod:`continuum_tiered.core.request_body`); any other body that is not a JSON object goes
upstream untouched, for the server to answer. Every other request, and every response,
passes through byte for byte: responses are relayed chunk by chunk as the upstream sends
them (so server-sent events stream), with the upstream's status and headers. A client
that disconnects closes the upstream request, so vLLM aborts it, as it would for the
client itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from continuum_tiered.client.agent_program import ROUTING_HEADER, routing_key
from continuum_tiered.core.program_tagging import (
    COMPLETION_PATHS,
    ProgramTagger,
    ResponseWatch,
    Tagged,
    TaggingOptions,
)
from continuum_tiered.core.request_body import BodyError, bad_request_body

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
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
_ROUTING_HEADER_LOWER = ROUTING_HEADER.lower()


@dataclass(frozen=True)
class ProxyOptions(TaggingOptions):
    connect_timeout_s: float = 10.0


def _upstream_headers(
    raw: list[tuple[bytes, bytes]], program_id: str | None
) -> list[tuple[bytes, bytes]]:
    """The client's headers as they go upstream: the proxy's own dropped and, for a request
    of a program, the program's routing key in place of any the client sent."""
    dropped = _NOT_FORWARDED | ({_ROUTING_HEADER_LOWER} if program_id is not None else set())
    headers = [(k, v) for k, v in raw if k.decode().lower() not in dropped]
    if program_id is not None:
        headers.append((ROUTING_HEADER.encode(), routing_key(program_id).encode()))
    return headers


class ProxyEndpoint:
    """The ASGI endpoint behind every path."""

    def __init__(self, upstream: str, options: ProxyOptions) -> None:
        self.upstream = upstream.rstrip("/")
        self.options = options
        self.tagger = ProgramTagger(options)
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
        tagged = Tagged(body, None)
        if request.method in BODY_METHODS:
            completion = request.method == "POST" and request.url.path in COMPLETION_PATHS
            try:
                tagged = self.tagger.tag(body, request.headers, time.time(), completion)
            except BodyError as error:
                await _send_error(send, 400, bad_request_body(error))
                return
        upstream_request = self.client.build_request(
            request.method,
            httpx.URL(self.upstream + request.url.path, query=request.url.query.encode()),
            headers=_upstream_headers(request.headers.raw, tagged.program_id),
            content=tagged.body,
        )
        watch = ResponseWatch(self.tagger, tagged.open_turn) if tagged.open_turn else None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                await self._relay(upstream_request, send, watch)
                group.cancel_scope.cancel()
        finally:
            if watch is not None:
                watch.end()

    async def _relay(
        self, upstream_request: httpx.Request, send: Send, watch: ResponseWatch | None
    ) -> None:
        """The upstream's response, chunk by chunk, seen by ``watch`` on the way."""
        try:
            response = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as err:
            await _send_bad_gateway(send, self.upstream, err)
            return
        if watch is not None:
            watch.status(response.status_code)
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
                if watch is not None:
                    watch.body(chunk, last=False)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if watch is not None:
                watch.body(b"", last=True)
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
    await _send_error(send, 502, payload)


async def _send_error(send: Send, status: int, payload: bytes) -> None:
    headers = Headers({"content-type": "application/json", "content-length": str(len(payload))})
    await send({"type": "http.response.start", "status": status, "headers": headers.raw})
    await send({"type": "http.response.body", "body": payload})


def create_app(upstream: str, options: ProxyOptions | None = None) -> Starlette:
    """The proxy in front of the OpenAI server at ``upstream`` (e.g. ``http://host:8000``)."""
    endpoint = ProxyEndpoint(upstream, options or ProxyOptions())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await endpoint.client.aclose()

    return Starlette(routes=[Route("/{path:path}", endpoint)], lifespan=lifespan)
