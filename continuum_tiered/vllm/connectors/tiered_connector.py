"""``ContinuumTieredConnector``: ``ContinuumConnector`` composed with LMCache's connector.

A ``MultiConnector`` (same ``connectors`` list in ``kv_connector_extra_config``, e.g.
``[ContinuumConnector, LMCacheConnectorV1]``; on vLLM's CPU build the LMCache child gets
our KV connector through the plugin's registry entry, ``plugin.give_lmcache_the_cpu_connector``)
that also:

- binds ``ContinuumConnector`` to LMCache's tiers (``WrittenThroughTiers``, read from
  LMCache's storage manager), so a pin's TTL is weighed against the reload cost of the
  tier that really holds the KV;
- loads a hit from LMCache only where the transfer beats recomputing it (``core.tier_model``:
  the scheduler tracks which tier holds each block, the profile prices both ways); LMCache
  alone loads every hit, and a short prefix on a slow disk takes longer than its prefill;
- counts, for each returning turn (hint ``turn > 0``), where its prompt tokens came from:
  the GPU prefix cache (pins), LMCache's CPU tier, its disk tier, the remote tier shared by
  replicas, or recompute. The counts
  travel in ``ContinuumConnector``'s stats (``vllm:continuum_prefix_tokens_from_*``).

LMCache's engine lives in the worker process, so the worker half looks up tiers (per
request it saved or loaded this step) and sends them to the scheduler half in its worker
metadata, one step later. Expiry is demotion without extra work: LMCache stores a turn's KV
to its tiers while the turn runs, so when a pin expires only the GPU copy goes.

With ``disk_cleanup_dir`` in its own extra config, the worker removes that directory (the
disk tier's, see ``continuum_tiered.vllm.tiers``) when it shuts down.

vLLM treats only the name ``MultiConnector`` as "hybrid KV cache manager support depends on
the children", so this connector needs ``--disable-hybrid-kv-cache-manager`` (``serve
--tiers`` passes it).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import (
    MultiConnector,
    MultiKVConnectorStats,
    MultiKVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from continuum_tiered.core.hints import HintError, request_hints
from continuum_tiered.core.tier_model import LOCAL_TIERS, TIER_ORDER, LoadCost, TierStore
from continuum_tiered.policies import DEFAULT_POLICY_WITH_TIERS
from continuum_tiered.vllm import compat
from continuum_tiered.vllm.connectors.continuum_connector import ContinuumConnector
from continuum_tiered.vllm.connectors.stats import (
    DECLINED_LOADS,
    PREFIX_SOURCES,
    ContinuumStats,
    prefix_counter,
)
from continuum_tiered.vllm.lmcache.residency import LMCacheResidency
from continuum_tiered.vllm.plugin import CONNECTOR_NAME
from continuum_tiered.vllm.tiers import lmcache_tier_bytes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


@dataclass
class TierReport(MultiKVConnectorWorkerMetadata):
    """The children's worker metadata plus what the worker saw of LMCache's tiers:
    ``loaded``: request id -> tokens it is loading from each tier this step;
    ``residency``: request id -> the tier its stored prefix reloads from (None: nowhere)."""

    loaded: dict[str, dict[str, int]] = field(default_factory=dict)
    residency: dict[str, str | None] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> TierReport:
        assert isinstance(other, TierReport)
        children = super().aggregate(other)
        assert isinstance(children, MultiKVConnectorWorkerMetadata)
        # Tensor-parallel workers hold the same chunks: one worker's view is the answer.
        return TierReport(
            metadata=children.metadata,
            loaded={**other.loaded, **self.loaded},
            residency={**other.residency, **self.residency},
        )


@dataclass
class WrittenThroughTiers:
    """LMCache's tiers as ``ContinuumConnector`` sees them (a ``TierLink``): the tier the
    worker last saw holding a request's prefix, if the tier profile knows that tier.
    ``residency`` is the tiered connector's own map, updated as the worker reports."""

    residency: dict[str, str | None]
    profile_tiers: Collection[str]
    # LMCache stores every turn while it runs: by the time a policy asks for a copy in a
    # lower tier (InferCept's swap), it is there already.
    can_offload = True

    def now(self) -> float:
        return time.time()

    def tier_after_release(self, request: Request) -> str | None:
        tier = self.residency.get(request.request_id)
        return tier if tier in self.profile_tiers else None

    def offload(self, request: Request) -> None:
        return


class ContinuumTieredConnector(MultiConnector):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ):
        if not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "ContinuumTieredConnector needs --disable-hybrid-kv-cache-manager (LMCache's "
                "connector does not support vLLM's hybrid KV cache manager)"
            )
        default_pins_off(vllm_config)
        super().__init__(vllm_config, role, kv_cache_config)
        children = self.sub_connectors
        self._continuum = _only(children, ContinuumConnector)
        self._lmcache = _only(children, LMCacheConnectorV1)
        self._lmcache_index = children.index(self._lmcache)
        # Worker half.
        self._lookup = LMCacheResidency()
        self._report = TierReport(metadata=())
        self._disk_cleanup_dir: str | None = vllm_config.kv_transfer_config.get_from_extra_config(
            "disk_cleanup_dir", None
        )
        # Scheduler half.
        self._live: set[str] = set()
        self._residency: dict[str, str | None] = {}
        self._local_hits: dict[str, int] = {}
        self._awaiting_split: set[str] = set()
        self._counts = dict.fromkeys([*map(prefix_counter, PREFIX_SOURCES), DECLINED_LOADS], 0)
        self._declined: dict[str, int] = {}  # request -> hit tokens it will recompute
        self._block_size = vllm_config.cache_config.block_size
        self._shadow: TierStore | None = None
        self._load_cost: LoadCost | None = None
        # The LMCache child's own config, as MultiConnector built it (vLLM's base keeps it).
        self._lmcache_config = compat.own_kv_transfer_config(
            self._lmcache
        ).kv_connector_extra_config
        if role == KVConnectorRole.SCHEDULER:
            self._warn_on_missing_profile_tiers()
            profile = self._continuum.options.profile
            self._continuum.bind_tiers(
                WrittenThroughTiers(self._residency, profile.tiers if profile else ())
            )
            self._cost_aware_loads()

    # ---------------------------------------------------------------- worker

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Before LMCache retrieves (which promotes disk chunks to CPU).
        for meta in self._lmcache_requests():
            spec = meta.load_spec
            if spec is not None and spec.can_load:
                self._lookup.forget_vanished_disk_chunks(meta.token_ids, meta.request_configs)
                self._report.loaded[meta.req_id] = self._lookup.tokens_per_tier(
                    meta.token_ids,
                    spec.vllm_cached_tokens,
                    spec.lmcache_cached_tokens,
                    meta.request_configs,
                )
        super().start_load_kv(forward_context, **kwargs)

    def wait_for_save(self) -> None:
        super().wait_for_save()
        for meta in self._lmcache_requests():
            if meta.save_spec is not None and meta.save_spec.can_save:
                self._report.residency[meta.req_id] = self._lookup.tier_of(
                    meta.token_ids, meta.request_configs
                )

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        children = super().build_connector_worker_meta()
        report, self._report = self._report, TierReport(metadata=())
        if children is None and not report.loaded and not report.residency:
            return None
        report.metadata = (
            children.metadata  # type: ignore[union-attr]
            if children is not None
            else (None,) * len(self.sub_connectors)
        )
        return report

    def shutdown(self) -> None:
        super().shutdown()
        if self.role == KVConnectorRole.WORKER and self._disk_cleanup_dir:
            shutil.rmtree(self._disk_cleanup_dir, ignore_errors=True)
            logger.info("continuum-tiered: removed the disk tier %s", self._disk_cleanup_dir)

    def _lmcache_requests(self) -> list[Any]:
        if not self._lmcache.has_connector_metadata():
            return []
        return list(getattr(compat.connector_metadata(self._lmcache), "requests", []))

    # ------------------------------------------------------------- scheduler

    @property
    def _routes(self) -> dict[str, int]:
        """Which child each request's lookup went to: MultiConnector's own map."""
        return compat.multi_connector_routes(self)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        self._live.add(request.request_id)
        self._local_hits[request.request_id] = num_computed_tokens
        self._declined.pop(request.request_id, None)  # each lookup decides afresh
        tokens, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if tokens and self._recompute_rather_than_load(request, num_computed_tokens, tokens):
            # LMCache is told 0 tokens in update_state_after_alloc and loads nothing.
            del self._routes[request.request_id]
            self._declined[request.request_id] = tokens  # counted once it is scheduled
            return 0, False
        return tokens, load_async

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        local = self._local_hits.pop(request.request_id, 0)
        self._counts[DECLINED_LOADS] += self._declined.pop(request.request_id, 0)
        if _is_returning_turn(request):
            from_lmcache = (
                num_external_tokens
                if self._routes.get(request.request_id) == self._lmcache_index
                else 0
            )
            self._count("gpu", local)
            self._count("recompute", request.num_prompt_tokens - local - num_external_tokens)
            if from_lmcache:
                self._awaiting_split.add(request.request_id)
        if num_external_tokens:  # a load promotes what it read to LMCache's CPU tier
            self._shadow_store(request, local, local + num_external_tokens)
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = connector_output.kv_connector_worker_meta
        if isinstance(report, TierReport):
            for req_id, tier in report.residency.items():
                if req_id in self._live:
                    self._residency[req_id] = tier
            for req_id, per_tier in report.loaded.items():
                if req_id in self._awaiting_split:
                    self._awaiting_split.discard(req_id)
                    for tier, tokens in per_tier.items():
                        self._count(tier, tokens)
        # A request that finished in the step that loaded it (vLLM calls request_finished
        # before this) got its split above; one whose report never came is dropped here.
        self._awaiting_split &= self._live
        super().update_connector_output(connector_output)

    def request_finished(self, request: Request, blocks: list[int]) -> tuple[bool, Any]:
        result = super().request_finished(request, blocks)
        self._shadow_store(request, 0, request.num_tokens)  # LMCache writes it through
        self._live.discard(request.request_id)
        for mapping in (self._local_hits, self._residency, self._declined):
            mapping.pop(request.request_id, None)
        return result

    def get_kv_connector_stats(self) -> MultiKVConnectorStats | None:
        stats = super().get_kv_connector_stats()
        counts = {k: v for k, v in self._counts.items() if v}
        if not counts:
            return stats
        self._counts = dict.fromkeys(self._counts, 0)
        stats = stats if stats is not None else MultiKVConnectorStats()
        name = ContinuumConnector.__name__
        ours = ContinuumStats(counts)
        stats[name] = stats[name].aggregate(ours) if name in stats.data else ours
        return stats

    def _count(self, source: str, tokens: int) -> None:
        key = prefix_counter(source)
        if key in self._counts and tokens > 0:
            self._counts[key] += tokens

    def _cost_aware_loads(self) -> None:
        """Sets up the scheduler's model of LMCache's tiers and the prices of a load and a
        prefill; without tier sizes in LMCache's extra config or without the local tiers in
        the profile, every hit is loaded, as LMCache alone would (and a remote hit is, where
        the profile has no remote tier)."""
        profile = self._continuum.options.profile
        sizes = lmcache_tier_bytes(self._lmcache_config)
        if profile is None or sizes is None or any(t not in profile.tiers for t in LOCAL_TIERS):
            return
        block_bytes = self._block_size * profile.model.kv_bytes_per_token
        self._shadow = TierStore.sized(
            sizes["cpu"], sizes.get("disk", 0.0), block_bytes, sizes.get("remote", 0.0)
        )
        self._load_cost = LoadCost(
            profile.tiers,
            self._block_size,
            block_bytes,
            profile.serving_prefill_coeffs,
            layerwise=bool(self._lmcache_config.get("lmcache.use_layerwise", False)),
        )

    def _recompute_rather_than_load(self, request: Request, computed: int, hit: int) -> bool:
        if (
            self._shadow is None
            or self._load_cost is None
            or self._routes.get(request.request_id) != self._lmcache_index
        ):
            return False
        keys = self._blocks(request, computed, computed + hit)
        found = self._shadow.lookup(keys)
        # Blocks LMCache holds that the model does not know of: another replica's, in the
        # remote tier where there is one; else ones it lost track of, assumed in the fast tier.
        unknown = "remote" if self._shadow.has_remote else "cpu"
        found += [unknown] * (len(keys) - len(found))
        return not self._load_cost.load_pays(computed, found, request.num_prompt_tokens)

    def _shadow_store(self, request: Request, start_token: int, end_token: int) -> None:
        if self._shadow is not None:
            for key in self._blocks(request, start_token, end_token):
                self._shadow.store(key)

    def _blocks(self, request: Request, start_token: int, end_token: int) -> list[Any]:
        return request.block_hashes[start_token // self._block_size : end_token // self._block_size]

    def _warn_on_missing_profile_tiers(self) -> None:
        """Name the configured tiers the profile does not price, and what is assumed."""
        profile = self._continuum.options.profile
        sizes = lmcache_tier_bytes(self._lmcache_config) or dict.fromkeys(LOCAL_TIERS)
        priced = profile.tiers if profile is not None else {}
        missing = [t for t in TIER_ORDER if t in sizes and t not in priced]
        if missing:
            logger.warning(
                "continuum-tiered: the tier profile has no %s tier; TTLs treat KV found "
                "there as lost (recompute cost), and hits there are loaded without pricing "
                "(measure it: continuum-tiered profile --tiers ...)",
                " or ".join(missing),
            )


def _only(connectors: list[Any], cls: type) -> Any:
    found = [c for c in connectors if isinstance(c, cls)]
    if len(found) != 1:
        raise ValueError(
            f"ContinuumTieredConnector needs exactly one {cls.__name__} among its "
            f"connectors, found {len(found)}"
        )
    return found[0]


def _is_returning_turn(request: Request) -> bool:
    try:
        hints = request_hints(request)
    except HintError:
        return False
    return hints is not None and hints.turn > 0


def default_pins_off(vllm_config: VllmConfig) -> None:
    """A ``ContinuumConnector`` child configured without a policy gets the one for tiers
    (``DEFAULT_POLICY_WITH_TIERS``: no pins), before ``MultiConnector`` builds it."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    for child in extra.get("connectors", ()):
        if child.get("kv_connector") == CONNECTOR_NAME:
            child_extra = child.setdefault("kv_connector_extra_config", {})
            child_extra.setdefault("policy", DEFAULT_POLICY_WITH_TIERS)
