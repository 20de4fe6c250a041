"""LMCache's CPU and disk tiers, modelled for the virtual-time replay.

What is modelled (DESIGN.md section 4): write-through of every finished request's KV
(prompt and decode tokens, as with ``save_decode_cache``) into a CPU tier with LRU
eviction; what the CPU tier evicts is demoted to a disk tier, also LRU; on a new request,
the longest run of blocks beyond vLLM's own prefix hit that a tier holds is loaded
synchronously, disk hits being promoted to CPU. Loads cost the profiled tier bandwidth and
latency, added to the step that schedules the request, or with ``layerwise`` (LMCache's
``use_layerwise``: layer i+1 loads while layer i computes) overlapped with the step's
compute. Entries are vLLM's block hashes,
so a hit is exactly the prefix a real LMCache lookup would find (at block rather than
256-token chunk granularity).

``SimLMCacheConnector`` is a scheduler-side vLLM connector; the replay composes it with
``ContinuumConnector`` through vLLM's ``MultiConnector`` as a deployment would.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from continuum_tiered.connectors.scheduler_only import SchedulerOnlyConnector
from continuum_tiered.profile import Tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "SimLMCache"
TIER_ORDER = ("cpu", "disk")


class LRUTier:
    """A capacity in blocks; inserting past it evicts least recently used entries."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self._entries: OrderedDict[Any, None] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Any) -> list[Any]:
        """Insert or refresh ``key``; return the keys evicted to make room."""
        if self.capacity <= 0:
            return [key]
        self._entries[key] = None
        self._entries.move_to_end(key)
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._entries.popitem(last=False)[0])
        return evicted

    def discard(self, key: Any) -> None:
        self._entries.pop(key, None)


@dataclass
class TierStore:
    cpu: LRUTier
    disk: LRUTier

    def store(self, key: Any) -> None:
        for demoted in self.cpu.put(key):
            self.disk.put(demoted)
        self.disk.discard(key)  # now in CPU: the faster copy

    def lookup(self, keys: list[Any]) -> list[str]:
        """The tier of each leading key found, stopping at the first miss."""
        found = []
        for key in keys:
            tier = "cpu" if key in self.cpu else "disk" if key in self.disk else None
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
        return None


class SimLMCacheConnector(SchedulerOnlyConnector):
    """Scheduler side only; configured by ``kv_connector_extra_config``:
    ``cpu_bytes``, ``disk_bytes``, ``kv_bytes_per_token``, ``tiers``
    ({name: [bandwidth_bytes_per_s, latency_s]}), ``write_through`` (default true;
    false stores only what ``offload`` is given) and ``layerwise`` (default false), which
    the replay fills in."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        self.block_bytes = self.block_size * int(extra["kv_bytes_per_token"])
        self.tiers = {name: Tier(name, *spec) for name, spec in extra["tiers"].items()}
        self.store = TierStore(
            LRUTier(int(extra["cpu_bytes"] // self.block_bytes)),
            LRUTier(int(extra["disk_bytes"] // self.block_bytes)),
        )
        self.write_through = bool(extra.get("write_through", True))
        self.layerwise = bool(extra.get("layerwise", False))
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self._planned: dict[str, tuple[int, list[str]]] = {}  # request -> (first block, tiers)
        self._transfer_s = 0.0
        self.loaded_tokens = dict.fromkeys(TIER_ORDER, 0)

    def step_with_loads(self, compute_s: float) -> float:
        """The step's time once the loads planned for it are done.

        Synchronous loads run before the forward pass. Layerwise ones overlap it, one
        layer ahead: the step takes the longer of the two plus one layer of the shorter.
        """
        load_s, self._transfer_s = self._transfer_s, 0.0
        if not self.layerwise:
            return compute_s + load_s
        return max(compute_s, load_s) + min(compute_s, load_s) / self.num_layers

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        start = num_computed_tokens // self.block_size
        # At least one prompt token must be computed to produce the next token.
        limit = (request.num_prompt_tokens - 1) // self.block_size
        found = self.store.lookup(request.block_hashes[start:limit])
        if not found:
            return 0, False
        self._planned[request.request_id] = (start, found)
        return len(found) * self.block_size, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        planned = self._planned.pop(request.request_id, None)
        if planned is None or num_external_tokens == 0:
            return
        start, found = planned
        found = found[: num_external_tokens // self.block_size]
        for tier_name in TIER_ORDER:
            n = found.count(tier_name)
            if n:
                self._transfer_s += self.tiers[tier_name].transfer_time(n * self.block_bytes)
                self.loaded_tokens[tier_name] += n * self.block_size
        # Loaded blocks become the CPU tier's most recent (disk hits are promoted). A block
        # may have moved since the lookup (another request's promotion pushed it down).
        for key in request.block_hashes[start : start + len(found)]:
            self.store.store(key)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._planned.pop(request.request_id, None)
        if self.write_through:
            self.offload(request)
        return False, None

    def offload(self, request: Request) -> None:
        """Store the request's KV (every full block) in the CPU tier."""
        for key in request.block_hashes:
            self.store.store(key)

    def tier_after_release(self, request: Request) -> str | None:
        """Where the request's KV will be found once vLLM drops it (write-through only)."""
        return self.store.tier_of_prefix(len(request.block_hashes)) if self.write_through else None


def register() -> None:
    with contextlib.suppress(ValueError):  # already registered in this process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, __name__, "SimLMCacheConnector")
