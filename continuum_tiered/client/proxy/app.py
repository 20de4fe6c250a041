"""The proxy's ASGI app: program priority and hints on completions, everything else as is.

``POST /v1/completions`` and ``POST /v1/chat/completions`` bodies get ``priority`` (the
program's first arrival in ms) and ``kv_transfer_params.continuum`` hints (program id,
per-program turn counter, ``last_turn`` from the ``X-Program-Last-Turn: true`` header)
before they go upstream; see :mod:`continuum_tiered.client.proxy.programs` for how a request's
program is found. A client's own hints are kept, with their program id scoped as below.
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

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

import anyio
import httpx
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from continuum_tiered.client.agent_program import ROUTING_HEADER, program_priority, routing_key
from continuum_tiered.client.proxy.programs import (
    DEFAULT_PROGRAM_HEADER,
    ProgramRegistry,
    program_identity,
)
from continuum_tiered.core.hints import HINTS_KEY, HintError, ProgramHints, parse_hints
from continuum_tiered.core.request_body import BodyError, bad_request_body, load_json_object
from continuum_tiered.core.tenancy import api_key_scope, scope_xargs, scoped_program_id

REWRITTEN_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
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
_ROUTING_HEADER_LOWER = ROUTING_HEADER.lower()


@dataclass(frozen=True)
class ProxyOptions:
    program_header: str = DEFAULT_PROGRAM_HEADER
    idle_timeout_s: float = 600.0
    max_programs: int = 100_000
    connect_timeout_s: float = 10.0
    scope_programs: bool = True  # program ids per client API key
    trust_client_priority: bool = False


class Rewritten(NamedTuple):
    body: bytes
    program_id: str | None  # the (scoped) program the request belongs to, if any


def add_program_fields(
    body: bytes,
    headers: Mapping[str, str],
    programs: ProgramRegistry,
    options: ProxyOptions,
    now_s: float,
    completion: bool = True,
) -> Rewritten:
    """The body to send upstream for a request that arrived at ``now_s``, and its program.

    ``headers`` must be case-insensitive. ``completion``: a completion request, whose
    program the proxy finds and gives hints; other requests only have a client's
    ``priority`` replaced and its hints scoped. The body is returned as it came (the same
    object) when it is not a JSON object (the upstream answers it in its own words) or
    nothing in it changes. A completion without a program identity gets only ``priority``
    = its own arrival: a one-turn program whose KV the upstream frees as usual. Hints the
    client sent that are malformed go upstream as they are, for the server to reject (or
    its connector to ignore). Raises :class:`BodyError` for a body the proxy answers with
    HTTP 400 itself.
    """
    payload = load_json_object(body)
    if payload is None:
        return Rewritten(body, None)
    scope = api_key_scope(headers.get("authorization")) if options.scope_programs else None
    keep_priority = options.trust_client_priority and "priority" in payload
    params = payload.get("kv_transfer_params")
    first_arrival_s: float | None = None
    program_id: str | None = None
    changed = False
    if params is not None and (not isinstance(params, dict) or HINTS_KEY in params):
        # The client's own hints: scoped when well formed, else left for the server.
        try:
            client_hints = parse_hints(params)
        except HintError:
            client_hints = None
        if client_hints is not None:
            hints = _scoped(client_hints, scope)
            program_id = hints.program_id
            first_arrival_s, _ = programs.next_turn(program_id, now_s, hints.last_turn)
            payload["kv_transfer_params"] = {**params, **hints.to_params()}
            changed = True
    elif completion and (program_id := program_identity(headers, payload, options.program_header)):
        if scope is not None:
            program_id = scoped_program_id(scope, program_id)
        last_turn = headers.get(LAST_TURN_HEADER, "").strip().lower() == "true"
        first_arrival_s, turn = programs.next_turn(program_id, now_s, last_turn)
        hints = ProgramHints(program_id, turn, last_turn=last_turn)
        payload["kv_transfer_params"] = {**(params or {}), **hints.to_params()}
        changed = True
    if scope is not None and scope_xargs(payload, scope):
        changed = True  # the Continuum plugin's hints name programs too
    # Other paths get a priority only in place of the client's: not every one takes it.
    if not keep_priority and (completion or "priority" in payload):
        arrival_s = now_s if first_arrival_s is None else first_arrival_s
        payload["priority"] = program_priority(arrival_s)
        changed = True
    return Rewritten(json.dumps(payload).encode() if changed else body, program_id)


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


def _scoped(hints: ProgramHints, scope: str | None) -> ProgramHints:
    if scope is None:
        return hints
    return dataclasses.replace(hints, program_id=scoped_program_id(scope, hints.program_id))


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
        program_id = None
        if request.method in BODY_METHODS:
            completion = request.method == "POST" and request.url.path in REWRITTEN_PATHS
            try:
                body, program_id = add_program_fields(
                    body, request.headers, self.programs, self.options, time.time(), completion
                )
            except BodyError as error:
                await _send_error(send, 400, bad_request_body(error))
                return
        upstream_request = self.client.build_request(
            request.method,
            httpx.URL(self.upstream + request.url.path, query=request.url.query.encode()),
            headers=_upstream_headers(request.headers.raw, program_id),
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
