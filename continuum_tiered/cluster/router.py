"""vLLM's router (``vllm-router``, the vLLM project's Rust router) in front of the replicas.

With ``--policy consistent_hash`` it hashes a request's first non-empty ``x-session-id``,
``x-user-id``, ``x-tenant-id``, ... header (then body fields) onto a ring of the healthy
workers, so the ``X-Session-ID`` our client and proxy send keeps a program on one replica.
Health checks every second take a dead replica off the ring within a few seconds; its
programs move to the next replica on the ring, where the shared tier has their prefixes.
"""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from continuum_tiered.core.server_process import ServerProcess

# The policies that need nothing but the workers' URLs (cache_aware keeps its own prefix
# trees of the requests it saw; kv_aware needs the replicas' KV events, not set up here).
ROUTER_POLICIES = ("consistent_hash", "round_robin", "random", "power_of_two", "cache_aware")
HEALTH_CHECK_INTERVAL_S = 1
HEALTH_FAILURE_THRESHOLD = 2


class RouterError(RuntimeError):
    pass


def router_binary() -> str:
    """``vllm-router`` beside this Python (the cluster extra installs it), else on PATH."""
    beside_python = Path(sys.executable).with_name("vllm-router")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("vllm-router")
    if found is None:
        raise RouterError("no vllm-router: pip install 'continuum-tiered[cluster]'")
    return found


def router_command(worker_urls: Sequence[str], policy: str) -> list[str]:
    if policy not in ROUTER_POLICIES:
        raise ValueError(f"router policy {policy!r}: expected one of {', '.join(ROUTER_POLICIES)}")
    return [
        router_binary(),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--health-check-interval-secs", str(HEALTH_CHECK_INTERVAL_S),
        "--health-failure-threshold", str(HEALTH_FAILURE_THRESHOLD),
        "--log-level", "warning",
    ]  # fmt: skip


def router_server(
    worker_urls: Sequence[str], policy: str, log_path: Path, port: int | None = None
) -> ServerProcess:
    """The router as a :class:`ServerProcess` (``/health`` answers once it serves)."""
    return ServerProcess(router_command(worker_urls, policy), log_path, port=port)


def _post(url: str) -> None:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
    except urllib.error.HTTPError as err:
        raise RouterError(f"POST {url}: HTTP {err.code}: {err.read()[:300]!r}") from err


def add_worker(router_url: str, worker_url: str) -> None:
    """Put a worker on the router's ring (its HTTP API, as an operator would)."""
    _post(f"{router_url}/add_worker?url={urllib.parse.quote(worker_url, safe='')}")


def remove_worker(router_url: str, worker_url: str) -> None:
    """Take a worker off the router's ring."""
    _post(f"{router_url}/remove_worker?url={urllib.parse.quote(worker_url, safe='')}")
