"""The cluster's shared KV tier: LMCache's remote backend on a Redis server that every
replica reaches over the network, below its own CPU and disk tiers.

What is modelled: LMCache puts every stored chunk to every backend (see
:mod:`.tier_links`), so a block a replica stores goes to the shared tier too, written
over that replica's network link after the step that computed it, first come first
served, and found by every replica once the write is done. A lookup that runs past a
replica's own tiers goes on in the shared one; a hit costs the tier's latency plus its
bytes at its bandwidth, then the copy to the GPU, and is promoted into the replica's CPU
tier as a disk hit is. A replica that is lost takes its writes not yet done with it.
Not modelled: contention among replicas at the server (each replica's reads and writes
see the tier's figures as if alone).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable, Sequence

from continuum_tiered.core.profile import Tier, TierProfile
from continuum_tiered.core.tier_model import LRUTier
from continuum_tiered.sim.tier_links import DiskWriteQueue

SHARED_TIER = "remote"  # the profile's name for it, below "disk"

# Assumed, not measured (a profile's "remote" tier replaces it): one Redis server on a
# 100 Gb/s datacenter network, 12.5 GB/s line rate. Redis executes commands on one thread
# and LMCache moves each 256-token chunk (32 MiB of Llama-3.1-8B KV) as one value over one
# connection per worker, so we take 40% of line rate, 5 GB/s each way. 1 ms per transfer
# covers the network round trip (~0.1 ms within a datacenter) plus LMCache's
# serialization and Redis's command handling. 1 TB of server memory, evicting least
# recently used keys (Redis's allkeys-lru).
DEFAULT_SHARED_TIER = Tier(SHARED_TIER, 5e9, 1e-3)
DEFAULT_SHARED_TIER_BYTES = 1e12


def shared_tier_of(profile: TierProfile) -> Tier:
    """The profile's remote tier, else the assumed one above."""
    return profile.tiers.get(SHARED_TIER, DEFAULT_SHARED_TIER)


class SharedTier:
    def __init__(self, tier: Tier, block_bytes: int, capacity_bytes: float):
        self.tier = tier
        self.block_bytes = block_bytes
        unbounded = math.isinf(capacity_bytes)
        self._entries = LRUTier(sys.maxsize if unbounded else int(capacity_bytes // block_bytes))
        self._ready_at: dict[Hashable, float] = {}  # key -> when its write is done
        self._links: dict[int, DiskWriteQueue] = {}  # each replica's network link out
        self.blocks_written = 0
        self.blocks_loaded = 0

    def put(self, replica: int, now: float, keys: Sequence[Hashable]) -> None:
        """``replica`` stores ``keys`` from ``now`` on; the tier skips keys it holds."""
        new = [key for key in keys if key not in self._entries]
        if not new:
            return
        link = self._links.setdefault(replica, DiskWriteQueue(self.tier.write_bandwidth))
        link.settle(now)
        link.submit(now, new, self.block_bytes)
        for key in new:
            self._ready_at[key] = link.done_at(key) + self.tier.latency_s
            for evicted in self._entries.put(key):
                self._ready_at.pop(evicted, None)
        self.blocks_written += len(new)

    def readable_prefix(self, keys: Sequence[Hashable], now: float) -> int:
        """How many leading ``keys`` a lookup at ``now`` finds written."""
        found = 0
        for key in keys:
            if self._ready_at.get(key, math.inf) > now:
                break
            found += 1
        return found

    def loaded(self, keys: Sequence[Hashable]) -> None:
        """A replica read ``keys``: they become the most recently used."""
        for key in keys:
            self._entries.put(key)
        self.blocks_loaded += len(keys)

    def read_s(self, num_bytes: int) -> float:
        return self.tier.transfer_time(num_bytes) if num_bytes else 0.0

    def lose_replica(self, replica: int, at_s: float) -> None:
        """The replica's writes not done by ``at_s`` never land."""
        link = self._links.pop(replica, None)
        for key in link.drop_pending() if link is not None else ():
            if self._ready_at.get(key, 0.0) > at_s:
                self._entries.discard(key)
                del self._ready_at[key]
