"""``continuum-tiered proxy``: program-level scheduling and pins for agents that send no hints."""

from __future__ import annotations

import argparse

import httpx
import uvicorn

from continuum_tiered.client.proxy.app import ProxyOptions, create_app
from continuum_tiered.core.program_tagging import DEFAULT_PROGRAM_HEADER, LAST_TURN_HEADER
from continuum_tiered.core.tenancy import SCOPE_MODES


class ProxyError(ValueError):
    pass


def add_proxy_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "proxy",
        help="OpenAI API proxy that adds program priority and hints for unmodified agents",
        description=(
            "Forwards every request to the upstream vLLM server; completions get the "
            "program's priority and continuum hints. A request's program is the "
            f"--program-header header, else the body's `user`, else the session_id or "
            f"X-Session-Id header, else the conversation the request extends (its previous "
            f"prompt and reply are a prefix of it); `{LAST_TURN_HEADER}: true` marks a last "
            f"turn. Program ids "
            "are scoped per client API key and a client's own priority is replaced, unless "
            "told otherwise."
        ),
    )
    p.add_argument("--upstream", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument(
        "--program-header",
        default=DEFAULT_PROGRAM_HEADER,
        help=f"the header naming a request's program (default: {DEFAULT_PROGRAM_HEADER})",
    )
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=600.0,
        help="forget a program after this long without requests (default: 600)",
    )
    p.add_argument(
        "--scope-programs",
        choices=SCOPE_MODES,
        default="api-key",
        help="api-key (default): program ids are per client API key (Authorization: Bearer), "
        "so no client can end or take over another key's program; none: ids as found",
    )
    p.add_argument(
        "--trust-client-priority",
        action="store_true",
        help="keep a priority the client sent (default: replaced by its program's)",
    )
    p.add_argument(
        "--no-conversation-identity",
        dest="conversations",
        action="store_false",
        help="a request that names no program is a one-turn program (default: the program "
        "whose conversation it extends, or a new one)",
    )
    p.add_argument(
        "--max-conversations",
        type=int,
        default=10_000,
        help="live conversations the index holds; the least recent goes first (default: 10000)",
    )
    p.set_defaults(run=run_proxy)


def check_upstream(upstream: str) -> str:
    try:
        url = httpx.URL(upstream)
    except httpx.InvalidURL as err:
        raise ProxyError(f"--upstream {upstream!r} is not a URL: {err}") from err
    if url.scheme not in ("http", "https") or not url.host:
        raise ProxyError(f"--upstream expects http(s)://HOST[:PORT], got {upstream!r}")
    return upstream


def run_proxy(args: argparse.Namespace, passthrough: list[str]) -> int:
    if args.idle_timeout_s <= 0:
        raise ProxyError(f"--idle-timeout-s must be > 0, got {args.idle_timeout_s}")
    if args.max_conversations < 1:
        raise ProxyError(f"--max-conversations must be >= 1, got {args.max_conversations}")
    if not args.program_header:
        raise ProxyError("--program-header must not be empty")
    options = ProxyOptions(
        program_header=args.program_header,
        idle_timeout_s=args.idle_timeout_s,
        scope_programs=args.scope_programs == "api-key",
        trust_client_priority=args.trust_client_priority,
        conversations=args.conversations,
        max_conversations=args.max_conversations,
    )
    app = create_app(check_upstream(args.upstream), options)
    print(f"continuum-tiered proxy: http://{args.host}:{args.port} -> {args.upstream}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port)
    return 0
