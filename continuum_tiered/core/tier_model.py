"""A scheduler-side model of LMCache's tiers, and whether a hit is worth loading.

LMCache answers a lookup with a hit length, not with the tier that holds it, and it loads
every hit it reports: a short prefix on a slow disk (2 GB/s on an H100 host, ~0.3 s for
5k tokens of Llama-3.1-8B) then takes longer than recomputing it (~0.1 s). The scheduler
sees every request that finishes, which is all LMCache stores with write-through, so it
can keep the same LRU order LMCache keeps: KV goes to the CPU tier, the CPU tier's least
recently used entries fall to disk, a load promotes back to CPU. Entries are vLLM block
hashes; the virtual-time replay uses this model as LMCache itself, the real connector as
an estimate (LMCache's 256-token chunks and its own eviction timing can make it drift;
a wrong estimate costs time, never correctness).

The remote tier (a Redis server shared by replicas) is written through too, and LMCache
looks it up last. Other replicas write into it and Redis evicts by its own LRU, so one
scheduler cannot know its contents: the model takes it to hold everything this replica
stored, and KV that LMCache finds where the model knows of nothing to be remote KV.
"""

from __future__ import annotations

import math
import sys
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from continuum_tiered.core.profile import Tier, prefill_increment

# The KV tiers below the GPU, nearest first: LMCache's CPU memory, its disk, and the remote
# tier shared by replicas. Slowest last: a prefix split across tiers reloads at the pace of
# the slowest. LOCAL_TIERS: those of one machine.
LOCAL_TIERS = ("cpu", "disk")
TIER_ORDER = (*LOCAL_TIERS, "remote")
# LMCache's unit of storage and lookup (its default chunk_size): one key per chunk in
# every tier, one Redis value in the remote one.
LMCACHE_CHUNK_TOKENS = 256


class LRUTier:
    """A capacity in blocks; inserting past it evicts least recently used entries."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self._entries: OrderedDict[Hashable, None] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable) -> list[Hashable]:
        """Insert or refresh ``key``; return the keys evicted to make room."""
        if self.capacity <= 0:
            return [key]
        self._entries[key] = None
        self._entries.move_to_end(key)
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._entries.popitem(last=False)[0])
        return evicted

    def discard(self, key: Hashable) -> None:
        self._entries.pop(key, None)


@dataclass
class TierStore:
    cpu: LRUTier
    disk: LRUTier
    remote: LRUTier = field(default_factory=lambda: LRUTier(0))  # capacity 0: no remote tier

    @classmethod
    def sized(
        cls, cpu_bytes: float, disk_bytes: float, block_bytes: int, remote_bytes: float = 0.0
    ) -> TierStore:
        """Tiers of these sizes; an infinite size never evicts, a zero size holds nothing."""
        return cls(
            _tier(cpu_bytes, block_bytes),
            _tier(disk_bytes, block_bytes),
            _tier(remote_bytes, block_bytes),
        )

    @property
    def has_remote(self) -> bool:
        return self.remote.capacity > 0

    def store(self, key: Hashable) -> None:
        """Write ``key`` to the CPU tier (a disk copy goes: the CPU one is faster) and
        through to the remote tier."""
        self.disk.discard(key)
        for demoted in self.cpu.put(key):
            self.disk.put(demoted)
        if self.has_remote:
            self.remote.put(key)

    def lookup(self, keys: Sequence[Hashable]) -> list[str]:
        """The tier of each leading key found, stopping at the first miss."""
        found = []
        for key in keys:
            tier = next((name for name in TIER_ORDER if key in getattr(self, name)), None)
            if tier is None:
                break
            found.append(tier)
        return found

    def tier_of_prefix(self, num_blocks: int) -> str | None:
        """Where a just-stored context of ``num_blocks`` will be found: the first tier
        large enough to hold it (the cost model's estimate, not a lookup)."""
        if num_blocks <= self.cpu.capacity:
            return "cpu"
        if num_blocks <= self.cpu.capacity + self.disk.capacity:
            return "disk"
        if num_blocks <= self.remote.capacity:
            return "remote"
        return None


def _tier(size_bytes: float, block_bytes: int) -> LRUTier:
    return LRUTier(sys.maxsize if math.isinf(size_bytes) else int(size_bytes // block_bytes))


def transfer_s(tiers: Mapping[str, Tier], block_bytes: int, found: Sequence[str]) -> float:
    """Time to load blocks from the tiers named in ``found`` (one entry per block)."""
    return sum(tiers[t].transfer_time(n * block_bytes) for t, n in Counter(found).items())


@dataclass(frozen=True)
class LoadCost:
    """Decides whether a tier hit is loaded or recomputed: LMCache loads all of a hit or
    none of it, so the choice is the whole hit's transfer against its prefill after the
    prefix already on the GPU (``prefill_coeffs`` as in ``TierProfile``), over two turns:

    - A load promotes the hit's disk (or remote) chunks to the CPU tier; a recompute
      leaves them where they are (LMCache skips storing chunks it holds), so the program's
      next turn meets the same slow hit again. Declining such a hit costs its prefill twice, loading
      it costs the transfer now and a CPU reload next turn (each turn's load hiding behind
      that turn's compute as below). (Priced over one turn, every
      long disk hit is recomputed turn after turn: 3.9% more average JCT on SWE-bench 8B
      at 0.3 programs/s than loading every hit.)
    - With ``layerwise`` loads (LMCache's ``use_layerwise``) the transfer runs under the
      forward pass of the same step, so it only costs what the prompt's own compute does
      not hide: the prefill of the prompt's tokens after the hit is added to the side of
      the load. (Other requests in the batch hide more; counting only the request's own
      tokens keeps the decision safe when it runs alone.)"""

    tiers: Mapping[str, Tier]
    block_size: int
    block_bytes: int
    prefill_coeffs: tuple[float, float, float]
    layerwise: bool = False

    def load_pays(self, computed_tokens: int, found: Sequence[str], prompt_tokens: int) -> bool:
        """Whether loading the hit ``found`` (a tier per block) beats recomputing it; a
        hit in a tier the profile does not price is loaded, as LMCache alone would."""
        if not set(found) <= self.tiers.keys():
            return True
        hit_end = computed_tokens + len(found) * self.block_size
        prefill = prefill_increment(self.prefill_coeffs, computed_tokens, hit_end - computed_tokens)
        hidden = 0.0
        if self.layerwise:
            tail = max(0, prompt_tokens - hit_end)
            hidden = prefill_increment(self.prefill_coeffs, hit_end, tail)
        load = transfer_s(self.tiers, self.block_bytes, found)
        if set(found) - {"cpu"}:  # disk or remote chunks: a load promotes them to CPU
            promoted = transfer_s(self.tiers, self.block_bytes, ["cpu"] * len(found))
            return load + promoted < 2 * prefill + 2 * hidden
        return load < prefill + hidden
