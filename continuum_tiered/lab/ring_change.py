"""What a change of vllm-router's hash ring does to programs: the fraction whose replica
changes when a replica is added or removed.

Measured on the real router (``--policy consistent_hash``), driven through its HTTP API
(``/add_worker``, ``/remove_worker``) as an operator or an autoscaler would. The workers
are small HTTP servers that answer each completion with their own URL: where a request
goes depends only on the router, so no engine is needed to see it (and many programs and
ring sizes fit in seconds). Every program sends its id in ``X-Session-ID``, as
:class:`~continuum_tiered.client.agent_program.AgentProgram` does.

A consistent hash should move about 1/(N+1) of the programs when a replica joins N, all of
them to the new one, and exactly the removed replica's programs when one leaves; anything
else moves programs (their pins and local tiers) for nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from continuum_tiered.client.agent_program import ROUTING_HEADER
from continuum_tiered.cluster.router import add_worker, remove_worker, router_server
from continuum_tiered.core.net import free_port


def _worker_app(url: str) -> Starlette:
    async def health(_: Request) -> JSONResponse:
        return JSONResponse({})

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    async def completion(request: Request) -> JSONResponse:
        await request.body()
        choice = {"index": 0, "text": url, "finish_reason": "stop"}
        return JSONResponse({"object": "text_completion", "model": "tiny", "choices": [choice]})

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/models", models),
            Route("/v1/completions", completion, methods=["POST"]),
        ]
    )


@contextmanager
def identity_worker() -> Iterator[str]:
    """An HTTP server on a thread of this process that answers a completion with its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(
        uvicorn.Config(_worker_app(url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"worker on port {port} did not start")
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass(frozen=True)
class RingChange:
    change: str  # "add" or "remove"
    replicas_before: int
    replicas_after: int
    programs: int
    moved: float  # fraction of programs whose replica changed
    ideal: float  # what a consistent hash moves: 1/(N+1) on add, the removed share on remove
    moved_elsewhere: int  # programs that moved to an old replica on add / off a kept one


def placements(router_url: str, program_ids: Sequence[str]) -> dict[str, str]:
    """Each program's replica, from one completion per program through the router."""
    with httpx.Client(base_url=router_url, timeout=30) as client:
        return {
            program_id: client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "x", "max_tokens": 1},
                headers={ROUTING_HEADER: program_id},
            ).json()["choices"][0]["text"]
            for program_id in program_ids
        }


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [p for p in before if before[p] != after[p]]


def measure(replicas: int, programs: int, log_dir: Path) -> list[RingChange]:
    """Add a replica to ``replicas``, then remove one of the original ones."""
    ids = [f"program-{i}" for i in range(programs)]
    with ExitStack() as stack:
        workers = [stack.enter_context(identity_worker()) for _ in range(replicas + 1)]
        original, extra = workers[:replicas], workers[replicas]
        router = router_server(original, "consistent_hash", log_dir / f"router-{replicas}.log")
        stack.enter_context(router)
        base = placements(router.url, ids)
        add_worker(router.url, extra)
        grown = placements(router.url, ids)
        moved_add = _changed(base, grown)
        remove_worker(router.url, extra)
        if placements(router.url, ids) != base:
            raise RuntimeError("removing the added replica did not restore the ring")
        removed = original[0]
        remove_worker(router.url, removed)
        shrunk = placements(router.url, ids)
        moved_remove = _changed(base, shrunk)
    on_removed = sum(base[p] == removed for p in ids)
    return [
        RingChange(
            "add",
            replicas,
            replicas + 1,
            programs,
            len(moved_add) / programs,
            1 / (replicas + 1),
            sum(grown[p] != extra for p in moved_add),
        ),
        RingChange(
            "remove",
            replicas,
            replicas - 1,
            programs,
            len(moved_remove) / programs,
            on_removed / programs,
            sum(base[p] != removed for p in moved_remove),
        ),
    ]


def measure_ring_changes(
    replica_counts: Sequence[int], programs: int, log_dir: Path
) -> list[dict[str, Any]]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return [asdict(c) for n in replica_counts for c in measure(n, programs, log_dir)]


def ring_table(changes: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| change | replicas | programs moved | consistent-hash ideal | moved needlessly |",
        "|---|---|---:|---:|---:|",
    ]
    for c in changes:
        lines.append(
            f"| {c['change']} | {c['replicas_before']} -> {c['replicas_after']} | "
            f"{c['moved']:.1%} | {c['ideal']:.1%} | {c['moved_elsewhere']} of {c['programs']} |"
        )
    return lines
