"""One virtual-time run: a peer's configuration, a deployment, a trace at one load."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from vllm.config import VllmConfig

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.metrics import RunSummary, summarize
from continuum_tiered.core.profile import TierProfile
from continuum_tiered.core.profile_source import resolve_profile
from continuum_tiered.core.tier_model import LOCAL_TIERS
from continuum_tiered.sim.lmcache_model import CONNECTOR_NAME as LMCACHE_CONNECTOR
from continuum_tiered.sim.lmcache_model import register as register_lmcache_model
from continuum_tiered.sim.peers import QUEUE_ORDERS, Peer
from continuum_tiered.sim.program_run import ProgramRun
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.sim.step_time import StepTimeModel
from continuum_tiered.sim.tier_links import LinkFigures, StoreStats
from continuum_tiered.sim.virtual_engine import Arrivals, Replicas, VirtualEngine
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.vllm.plugin import CONNECTOR_NAME
from continuum_tiered.vllm.serve import kv_transfer_config


@dataclass(frozen=True)
class ReplaySetup:
    deployment: Deployment
    profile_ref: str | None  # built-in name or path; None: roofline estimate of the model
    seed: int = 0

    @property
    def model_dir(self) -> Path:
        return _model_dir(self.deployment)

    def profile(self) -> TierProfile:
        d = self.deployment
        return resolve_profile(self.profile_ref, d.hf_config(), name=d.model, device=d.device)


@cache
def _model_dir(deployment: Deployment) -> Path:
    if Path(deployment.model, "config.json").is_file():
        return Path(deployment.model)
    return deployment.write_config(Path(tempfile.mkdtemp(prefix="ct-model-")))


def unlimited_blocks(deployment: Deployment, programs: list[TraceProgram]) -> int:
    """Enough blocks for every program's final context at once, plus margin (blocks of
    the full layout: with the hybrid KV cache manager, vLLM's groups get their bytes)."""
    per_program = (
        (p.turns[-1].prompt_tokens + p.turns[-1].output_tokens) // deployment.block_size + 2
        for p in programs
    )
    return sum(per_program) + deployment.max_num_seqs


def connector_config(peer: Peer, setup: ReplaySetup, profile: TierProfile) -> dict[str, Any] | None:
    """The peer's KV connectors as a deployment would configure them."""
    configs: list[dict[str, Any]] = []
    if peer.lmcache:
        d = setup.deployment
        missing = [t for t in LOCAL_TIERS if t not in profile.tiers]
        if missing:
            raise ValueError(
                f"policy {peer.name} needs the profile's {' and '.join(missing)} tier(s); "
                f"the profile has {sorted(profile.tiers) or 'none'}"
            )
        tiers = {
            t: [profile.tiers[t].bandwidth_bytes_per_s, profile.tiers[t].latency_s]
            for t in LOCAL_TIERS
        }
        links = LinkFigures.from_tiers(
            profile.tiers["cpu"], profile.tiers["disk"], profile.host_memcpy_bytes_per_s
        )
        extra = {
            "links": links.to_json(),
            "cpu_bytes": d.cpu_tier_bytes,
            "disk_bytes": d.disk_tier_bytes if peer.lmcache_disk else 0,
            "async": peer.async_transfers,
            "kv_bytes_per_token": d.kv_bytes_per_token(),
            "tiers": tiers,
            "write_through": peer.lmcache_write_through,
            "layerwise": peer.lmcache_layerwise,
            "free": peer.lmcache_free,
        }
        if peer.lmcache_cost_aware:
            extra["load_if_faster_than_prefill"] = list(profile.serving_prefill_coeffs)
        configs.append(kv_transfer_config(LMCACHE_CONNECTOR, extra))
    if peer.pin_policy is not None:
        extra = {"policy": peer.pin_policy, "device": setup.deployment.device}
        if peer.pin_options:
            extra["policy_options"] = dict(peer.pin_options)
        # The profile itself: the connector neither reads the file again nor estimates.
        extra["profile"] = profile.to_json()
        configs.append(kv_transfer_config(CONNECTOR_NAME, extra))
    if len(configs) <= 1:
        return configs[0] if configs else None
    # LMCache first: it stores a finished turn before the pin policy asks where it is.
    return kv_transfer_config("MultiConnector", {"connectors": configs})


def driver_config(
    peer: Peer, setup: ReplaySetup, programs: list[TraceProgram], profile: TierProfile
) -> DriverConfig:
    d = setup.deployment
    num_blocks = unlimited_blocks(d, programs) if peer.unlimited_kv else d.num_gpu_blocks()
    return DriverConfig(
        model_dir=setup.model_dir,
        num_blocks=num_blocks,
        block_size=d.block_size,
        max_model_len=d.hf_config()["max_position_embeddings"],
        max_num_batched_tokens=d.max_num_batched_tokens,
        max_num_seqs=d.max_num_seqs,
        scheduling_policy=peer.scheduling_policy,
        kv_transfer_config=connector_config(peer, setup, profile),
        async_scheduling=d.async_scheduling,
        log_stats=False,
        engine_overrides=(
            {} if peer.hybrid_kv_cache_manager else {"disable_hybrid_kv_cache_manager": True}
        ),
    )


_VLLM_CONFIGS: dict[str, VllmConfig] = {}


def replay(
    peer: Peer,
    programs: list[TraceProgram],
    setup: ReplaySetup,
    jps: float,
    on_program_done=lambda: None,
) -> tuple[RunSummary, list[ProgramRun]]:
    if peer.every_order:
        return _best_order(peer, programs, setup, jps, on_program_done)
    return _replay_once(peer, programs, setup, jps, on_program_done)


def _best_order(
    peer: Peer, programs: list[TraceProgram], setup: ReplaySetup, jps: float, on_program_done
) -> tuple[RunSummary, list[ProgramRun]]:
    """Each queue order with the peer's memory; the one with the lowest average JCT."""
    results = []
    for k, (policy, hooks) in enumerate(QUEUE_ORDERS):
        variant = replace(peer, scheduling_policy=policy, hooks=hooks)
        # Count programs once: only the last variant reports progress.
        report = on_program_done if k == len(QUEUE_ORDERS) - 1 else lambda: None
        results.append(_replay_once(variant, programs, setup, jps, report))
    return min(results, key=lambda result: result[0].avg_jct_s)


def _replay_once(
    peer: Peer,
    programs: list[TraceProgram],
    setup: ReplaySetup,
    jps: float,
    on_program_done,
) -> tuple[RunSummary, list[ProgramRun]]:
    engine = build_engine(peer, setup, programs)
    arrivals = Arrivals(programs)
    Replicas([engine], arrivals, lambda _run, live: live[0]).run(on_program_done)
    return summarize_engines(peer.name, jps, arrivals.runs, [engine]), arrivals.runs


def build_engine(
    peer: Peer, setup: ReplaySetup, programs: list[TraceProgram], replica: int = 0
) -> VirtualEngine:
    """One replica of ``peer``'s deployment, sized for ``programs``."""
    register_lmcache_model()
    profile = setup.profile()
    cfg = driver_config(peer, setup, programs, profile)
    key = repr(cfg)
    if key not in _VLLM_CONFIGS:  # building one takes seconds; loads reuse it
        _VLLM_CONFIGS[key] = build_vllm_config(cfg)
    driver = SchedulerDriver(cfg, _VLLM_CONFIGS[key])
    return VirtualEngine(
        driver,
        StepTimeModel.from_profile(profile, setup.deployment.hf_config()),
        peer.hooks,
        vocab_size=setup.deployment.hf_config()["vocab_size"],
        seed=setup.seed,
        request_overhead_s=profile.engine.request_overhead_s if profile.engine else 0.0,
        replica=replica,
    )


def summarize_engines(
    policy: str, jps: float, runs: list[ProgramRun], engines: list[VirtualEngine]
) -> RunSummary:
    """The programs' summary, with what the engines saw: KV blocks held per engine over
    its busy time, LMCache's stores and the pins made, summed over the engines."""
    summary = summarize(policy, jps, [r.outcome() for r in runs])
    busy_s = sum(e.busy_s for e in engines)
    mean_kv = sum(e.kv_block_seconds for e in engines) / busy_s if busy_s else 0.0
    stores = [e.lmcache.store_stats() for e in engines if e.lmcache is not None]
    pins = [e.pin_connector.pins.pins_created for e in engines if e.pin_connector is not None]
    return replace(
        summary,
        mean_kv_blocks=mean_kv,
        stores=StoreStats.combined(stores).to_json() if stores else None,
        pins_created=sum(pins) if pins else None,
    )
