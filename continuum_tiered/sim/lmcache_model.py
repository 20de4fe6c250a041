"""LMCache's CPU and disk tiers, modelled for the virtual-time replay.

What is modelled (docs/architecture.md, 'LMCache stores and loads'): write-through of every
request's KV (prompt and
decode tokens, as with ``save_decode_cache``) into the LRU tiers of ``core.tier_model``
(CPU, then disk); on a new request, the longest run of blocks beyond vLLM's own prefix
hit that a tier holds is loaded, disk hits being promoted to CPU. Entries are vLLM's
block hashes, so a hit is exactly the prefix a real LMCache lookup would find (at block
rather than 256-token chunk granularity).

Stores are written as they are computed: the blocks a step completes cost device->host
bandwidth in that step, then a disk write behind it. Loads cost host->device bandwidth
and, from disk, the disk read. How the links are shared, and when a store is dropped, is
in :mod:`.tier_links`. Without ``layerwise`` the loads run before the forward pass and
the stores after it; with ``layerwise`` (LMCache's ``use_layerwise``: layer i+1 moves
while layer i computes) both overlap the step's compute and each other.

With ``async`` it models vLLM's own CPU offloading connector (``--kv-offloading-size``)
instead: a hit is loaded asynchronously (the request waits in ``WAITING_FOR_REMOTE_KVS``
while the others run; loads queue on the host->device link) and stores are copied on a
side stream, off the step's critical path. Not modelled: that connector delays freeing a
finished request's blocks until their store is done (a store takes a fraction of a step
at PCIe rates).

In a cluster replay a replica's tiers can have the cluster's shared tier below them
(:mod:`.shared_tier`, bound with ``bind_shared_tier``).

``SimLMCacheConnector`` is a scheduler-side vLLM connector; the replay composes it with
``ContinuumConnector`` through vLLM's ``MultiConnector`` as a deployment would, and binds
it to the ``ContinuumConnector`` as its ``TierLink`` (on the replay's clock).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from continuum_tiered.core.profile import Tier
from continuum_tiered.core.tier_model import LoadCost, TierStore
from continuum_tiered.sim.shared_tier import SHARED_TIER, SharedTier
from continuum_tiered.sim.tier_links import DiskWriteQueue, LinkFigures, StoreStats, duplex_s
from continuum_tiered.vllm.connectors.scheduler_only import SchedulerOnlyConnector

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "SimLMCache"


class SimLMCacheConnector(SchedulerOnlyConnector):
    """Scheduler side only; configured by ``kv_connector_extra_config``:
    ``cpu_bytes``, ``disk_bytes``, ``kv_bytes_per_token``, ``tiers``
    ({name: [bandwidth_bytes_per_s, latency_s]}, what the cost-aware load decision
    prices), ``links`` (:class:`LinkFigures` as a dict: what transfers cost),
    ``write_through`` (default true; false stores only what ``offload`` is given),
    ``layerwise`` (default false) and ``load_if_faster_than_prefill`` (prefill
    coefficients [c0, c1, c2]: a hit whose transfer takes longer than its prefill is
    recomputed, as ``ContinuumTieredConnector`` decides; absent, every hit is loaded, as
    LMCache does), which the replay fills in, and ``free`` (default false; not LMCache but
    the bound on any retention policy): the CPU tier is unbounded and its loads and
    stores take no time, and ``async`` (default false; see the module docstring). An
    async model needs ``clock`` set to the replay's."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) > 1:
            # LMCache's connector stores every layer's KV per chunk: one KV cache group.
            raise ValueError(
                "LMCache does not support vLLM's hybrid KV cache manager: run with "
                "disable_hybrid_kv_cache_manager (the replay's LMCache peers do)"
            )
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        self.block_bytes = self.block_size * int(extra["kv_bytes_per_token"])
        self.tiers = {name: Tier(name, *spec) for name, spec in extra["tiers"].items()}
        self.links = LinkFigures(**extra["links"])
        self.free = bool(extra.get("free", False))
        cpu_bytes = math.inf if self.free else extra["cpu_bytes"]
        self.store = TierStore.sized(cpu_bytes, extra["disk_bytes"], self.block_bytes)
        self.disk_writes = (
            DiskWriteQueue(self.links.disk_write)
            if extra["disk_bytes"] > 0 and not self.free
            else None
        )
        self.layerwise = bool(extra.get("layerwise", False))
        coeffs = extra.get("load_if_faster_than_prefill")
        self.load_cost = (
            None
            if coeffs is None
            else LoadCost(
                self.tiers, self.block_size, self.block_bytes, tuple(coeffs), self.layerwise
            )
        )
        self.write_through = bool(extra.get("write_through", True))
        self.async_transfers = bool(extra.get("async", False))
        self._clock: Callable[[], float] = lambda: 0.0
        self._h2d_free_at = 0.0  # async loads queue on the link
        self._receiving: dict[str, float] = {}  # request -> when its async load is done
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self._requests: dict[str, Request] = {}
        self._planned: dict[str, tuple[int, list[str]]] = {}  # request -> (first block, tiers)
        self._loads = Counter[str]()  # blocks to load in the coming step, by tier
        self._stores: list[Hashable] = []  # blocks stored in the coming step
        self.stats = StoreStats()
        self.shared: SharedTier | None = None  # a cluster's tier below the disk
        self.replica = 0

    def bind_shared_tier(self, shared: SharedTier, replica: int) -> None:
        """Below this replica's disk, the cluster's shared tier (LMCache's remote backend):
        lookups go on in it, stores go to it too, loads from it are priced like any tier."""
        self.shared = shared
        self.replica = replica
        self.tiers[SHARED_TIER] = shared.tier  # the mapping the cost-aware decision prices

    # ------------------------------------------------- the TierLink, and its clock

    # ``offload`` stores into the modelled tiers, write-through or not.
    can_offload = True

    def bind_clock(self, clock: Callable[[], float]) -> None:
        """The replay's virtual clock: async loads queue on it."""
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    # --------------------------------------------------------------- the step

    def step_seconds(self, compute_s: float, now: float) -> float:
        """The step's time with the transfers planned for it; its stores then queue
        their disk writes."""
        load_bytes = {tier: n * self.block_bytes for tier, n in self._loads.items()}
        store_bytes = 0 if self.async_transfers else len(self._stores) * self.block_bytes
        self._loads.clear()
        if self.free:
            self._stores.clear()
            return compute_s
        disk = self.disk_writes
        if disk is not None:
            disk.settle(now)
        disk_read_s = self._disk_read_s(load_bytes.get("disk", 0), now)
        # A shared-tier hit crosses the network into host memory first, as a disk hit.
        below_host_s = disk_read_s
        if self.shared is not None:
            below_host_s += self.shared.read_s(load_bytes.get(SHARED_TIER, 0))
        h2d = sum(load_bytes.values())
        links = self.links
        latency = links.pcie_latency_s if h2d or store_bytes else 0.0
        if self.layerwise:
            transfer = max(below_host_s, duplex_s(h2d, store_bytes, links) + latency)
            seconds = max(compute_s, transfer) + min(compute_s, transfer) / self.num_layers
        else:
            seconds = compute_s + below_host_s + h2d / links.h2d + store_bytes / links.d2h + latency
        if disk is not None:
            disk.yield_to_read(now, disk_read_s)
            disk.submit(now + seconds, self._stores, self.block_bytes)
        if self.shared is not None:
            self.shared.put(self.replica, now + seconds, self._stores)
        self._stores.clear()
        return seconds

    def _disk_read_s(self, nbytes: int, now: float) -> float:
        if not nbytes:
            return 0.0
        busy = self.disk_writes is not None and self.disk_writes.busy(now)
        bandwidth = self.links.disk_read_under_write if busy else self.links.disk_read
        return self.links.disk_latency_s + nbytes / bandwidth

    def store_stats(self) -> StoreStats:
        disk = self.disk_writes
        if disk is not None and disk.blocks_written:
            self.stats.disk_blocks_written = disk.blocks_written
            self.stats.disk_write_delay_mean_s = disk.delay_sum_s / disk.blocks_written
            self.stats.disk_write_delay_max_s = disk.delay_max_s
        return self.stats

    # ------------------------------------------------------------- the hooks

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        self._requests[request.request_id] = request
        start = num_computed_tokens // self.block_size
        # At least one prompt token must be computed to produce the next token.
        limit = (request.num_prompt_tokens - 1) // self.block_size
        found = self._readable(request.block_hashes[start:limit])
        if not found:
            return 0, False
        if self.load_cost is not None and not self.load_cost.load_pays(
            num_computed_tokens, found, request.num_prompt_tokens
        ):
            return 0, False
        self._planned[request.request_id] = (start, found)
        return len(found) * self.block_size, self.async_transfers

    def _load_async(self, request_id: str, nbytes: int) -> None:
        start = max(self.now(), self._h2d_free_at)
        self._h2d_free_at = start + self.links.pcie_latency_s + nbytes / self.links.h2d
        self._receiving[request_id] = self._h2d_free_at

    def finished_loads(self, now: float) -> set[str]:
        """Async loads done by ``now``: what the workers would report as received."""
        done = {rid for rid, at in self._receiving.items() if at <= now}
        for rid in done:
            del self._receiving[rid]
        return done

    def next_load_done(self) -> float | None:
        return min(self._receiving.values(), default=None)

    def _readable(self, keys: list[Hashable]) -> list[str]:
        """The tiers of the leading keys a lookup finds; a disk copy still being written
        is not found yet."""
        found = self.store.lookup(keys)
        if self.disk_writes is not None:
            for i, tier in enumerate(found):
                if tier == "disk" and self.disk_writes.is_pending(keys[i]):
                    found = found[:i]
                    break
        if self.shared is not None:
            rest = keys[len(found) :]
            found += [SHARED_TIER] * self.shared.readable_prefix(rest, self.now())
        return found

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        planned = self._planned.pop(request.request_id, None)
        if planned is None or num_external_tokens == 0:
            return
        start, found = planned
        found = found[: num_external_tokens // self.block_size]
        if self.async_transfers:
            self._load_async(request.request_id, len(found) * self.block_bytes)
        else:
            self._loads.update(found)
        # Loaded blocks become the CPU tier's most recent (disk and shared-tier hits are
        # promoted). A block may have moved since the lookup (another request's promotion
        # pushed it down).
        keys = request.block_hashes[start : start + len(found)]
        for key in keys:
            self.store.store(key)
        if self.shared is not None:
            remote = [k for k, tier in zip(keys, found, strict=True) if tier == SHARED_TIER]
            self.shared.loaded(remote)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """Store the blocks this step completes (``num_computed_tokens`` has not moved yet)."""
        if self.write_through:
            for rid, n in scheduler_output.num_scheduled_tokens.items():
                request = self._requests.get(rid)
                if request is not None:
                    done = request.num_computed_tokens
                    first, end = done // self.block_size, (done + n) // self.block_size
                    self._store_new(request.block_hashes[first:end])
        return super().build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        # Write-through stored each block in the step that completed it (decode blocks
        # too: a block is hashed before the step that computes its last token).
        self._planned.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        return False, None

    def offload(self, request: Request) -> None:
        """Store the request's KV (every full block not stored yet) in the coming step."""
        self._store_new(request.block_hashes)

    def _store_new(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            if key in self.store.cpu or key in self.store.disk:
                continue  # LMCache skips chunks it holds
            if self._cpu_tier_all_pending():
                self.stats.blocks_dropped += 1
                continue
            self.store.store(key)
            self._stores.append(key)
            self.stats.blocks_stored += 1

    def _cpu_tier_all_pending(self) -> bool:
        """Every CPU chunk is held for its disk write: LMCache cannot allocate the store.
        (A zero-sized CPU tier is not one: the model then writes straight to disk.)"""
        if self.disk_writes is None:
            return False
        held = self.disk_writes.pending_blocks + len(self._stores)  # this step's too
        return 0 < self.store.cpu.capacity <= held

    def tier_after_release(self, request: Request) -> str | None:
        """Where the request's KV will be found once vLLM drops it (write-through only)."""
        return self.store.tier_of_prefix(len(request.block_hashes)) if self.write_through else None


def register() -> None:
    with contextlib.suppress(ValueError):  # already registered in this process
        KVConnectorFactory.register_connector(CONNECTOR_NAME, __name__, "SimLMCacheConnector")
