"""LMCache's CPU and disk tiers, modelled for the virtual-time replay.

What is modelled (DESIGN.md section 4): write-through of every finished request's KV
(prompt and decode tokens, as with ``save_decode_cache``) into the LRU tiers of
``lmcache_shadow`` (CPU, then disk for what the CPU tier evicts); on a new request, the
longest run of blocks beyond vLLM's own prefix hit that a tier holds is loaded, disk hits
being promoted to CPU. Loads cost the profiled tier bandwidth and latency, added to the
step that schedules the request, or with ``layerwise`` (LMCache's ``use_layerwise``:
layer i+1 loads while layer i computes) overlapped with the step's compute. Entries are
vLLM's block hashes, so a hit is exactly the prefix a real LMCache lookup would find (at
block rather than 256-token chunk granularity).

``SimLMCacheConnector`` is a scheduler-side vLLM connector; the replay composes it with
``ContinuumConnector`` through vLLM's ``MultiConnector`` as a deployment would.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from continuum_tiered.connectors.scheduler_only import SchedulerOnlyConnector
from continuum_tiered.lmcache_shadow import LoadCost, TierStore, transfer_s
from continuum_tiered.profile import Tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "SimLMCache"


class SimLMCacheConnector(SchedulerOnlyConnector):
    """Scheduler side only; configured by ``kv_connector_extra_config``:
    ``cpu_bytes``, ``disk_bytes``, ``kv_bytes_per_token``, ``tiers``
    ({name: [bandwidth_bytes_per_s, latency_s]}), ``write_through`` (default true;
    false stores only what ``offload`` is given), ``layerwise`` (default false) and
    ``load_if_faster_than_prefill`` (prefill coefficients [c0, c1, c2]: a hit whose
    transfer takes longer than its prefill is recomputed, as ``ContinuumTieredConnector``
    decides; absent, every hit is loaded, as LMCache does), which the replay fills in, and
    ``free`` (default false; not LMCache but the bound on any retention policy): the CPU
    tier is unbounded and its loads take no time."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.block_size = vllm_config.cache_config.block_size
        self.block_bytes = self.block_size * int(extra["kv_bytes_per_token"])
        self.tiers = {name: Tier(name, *spec) for name, spec in extra["tiers"].items()}
        self.free = bool(extra.get("free", False))
        cpu_bytes = math.inf if self.free else extra["cpu_bytes"]
        self.store = TierStore.sized(cpu_bytes, extra["disk_bytes"], self.block_bytes)
        coeffs = extra.get("load_if_faster_than_prefill")
        self.load_cost = (
            None
            if coeffs is None
            else LoadCost(self.tiers, self.block_size, self.block_bytes, tuple(coeffs))
        )
        self.write_through = bool(extra.get("write_through", True))
        self.layerwise = bool(extra.get("layerwise", False))
        self.num_layers = vllm_config.model_config.hf_text_config.num_hidden_layers
        self._planned: dict[str, tuple[int, list[str]]] = {}  # request -> (first block, tiers)
        self._transfer_s = 0.0

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
        if self.load_cost is not None and not self.load_cost.load_pays(num_computed_tokens, found):
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
        if not self.free:
            self._transfer_s += transfer_s(self.tiers, self.block_bytes, found)
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
