"""How a cluster's router picks a replica for each turn, as the routers in front of vLLM do.

- ``round-robin``: per request, the next live replica in turn.
- ``least-loaded``: the replica with the fewest requests running or waiting.
- ``program-affine``: a consistent hash of the program id, as vllm-router's
  ``consistent_hash`` policy hashes the session id: each replica owns many points (virtual
  nodes) on a ring and a key goes to the owner of the first point at or after its hash,
  so losing a replica moves only the keys it owned. 160 virtual nodes per replica, as
  vllm-router uses.
- ``cache-aware``: the replica holding the longest prefix of the turn's prompt (on its
  GPU or in its own LMCache tiers; the exact contents, as a precise prefix-cache scorer
  that follows the replicas' KV events sees them), ties to the least loaded.

Ties among equally loaded replicas go to the lowest replica index.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from continuum_tiered.sim.program_run import ProgramRun

VIRTUAL_NODES = 160


class ReplicaView(Protocol):
    """What a router reads of a replica."""

    replica: int

    def load(self) -> int: ...

    def held_prefix_blocks(self, block_hashes: list) -> int: ...


R = TypeVar("R", bound=ReplicaView)


def _point(key: str) -> int:
    """A stable 64-bit position on the ring (Python's ``hash`` varies per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, nodes: Iterable[int], virtual_nodes: int = VIRTUAL_NODES):
        self._ring = sorted((_point(f"{n}#{v}"), n) for n in nodes for v in range(virtual_nodes))

    @property
    def nodes(self) -> set[int]:
        return {n for _, n in self._ring}

    def node_for(self, key: str) -> int:
        if not self._ring:
            raise ValueError("the hash ring has no nodes")
        i = bisect.bisect_left(self._ring, (_point(key), -1))
        return self._ring[i % len(self._ring)][1]

    def remove(self, node: int) -> None:
        self._ring = [(p, n) for p, n in self._ring if n != node]


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def route(self, run: ProgramRun, live: Sequence[R]) -> R:
        chosen = live[self._next % len(live)]
        self._next += 1
        return chosen


class LeastLoaded:
    def route(self, run: ProgramRun, live: Sequence[R]) -> R:
        return min(live, key=lambda r: r.load())


class ProgramAffine:
    def __init__(self, replicas: int):
        self.ring = HashRing(range(replicas))

    def route(self, run: ProgramRun, live: Sequence[R]) -> R:
        by_index = {r.replica: r for r in live}
        for gone in self.ring.nodes - by_index.keys():  # the ring without lost replicas
            self.ring.remove(gone)
        return by_index[self.ring.node_for(run.program.program_id)]


class CacheAware:
    def route(self, run: ProgramRun, live: Sequence[R]) -> R:
        held = {r.replica: r.held_prefix_blocks(run.block_hashes) for r in live}
        return min(live, key=lambda r: (-held[r.replica], r.load()))


class Router(Protocol):
    def route(self, run: ProgramRun, live: Sequence[R]) -> R: ...


# Each router from the number of replicas.
ROUTERS: dict[str, Callable[[int], Router]] = {
    "round-robin": lambda _n: RoundRobin(),
    "least-loaded": lambda _n: LeastLoaded(),
    "program-affine": ProgramAffine,
    "cache-aware": lambda _n: CacheAware(),
}


FAILED_REPLICA = 0  # the replica a failure takes down


@dataclass(frozen=True)
class ClusterSpec:
    """``replicas`` copies of one deployment behind ``routing``; with ``fail_at_s``,
    replica ``FAILED_REPLICA`` is lost at that virtual time. ``shared_tier``: replicas
    with LMCache share a remote tier below their disks."""

    replicas: int
    routing: str = "program-affine"
    fail_at_s: float | None = None
    shared_tier: bool = True

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.routing not in ROUTERS:
            raise ValueError(f"unknown routing {self.routing!r}; choose from {', '.join(ROUTERS)}")
        if self.fail_at_s is not None and self.replicas < 2:
            raise ValueError("--fail-replica-at needs at least 2 replicas: one must survive")
        if self.fail_at_s is not None and self.fail_at_s < 0:
            raise ValueError(f"--fail-replica-at must be >= 0 seconds, got {self.fail_at_s}")

    def router(self) -> Router:
        return ROUTERS[self.routing](self.replicas)
