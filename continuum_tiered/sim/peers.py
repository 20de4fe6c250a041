"""The systems compared in the virtual-time replay, each as a configuration of one engine.

| name | queue order | KV across a tool call |
|---|---|---|
| ``vllm`` | request FCFS | freed on finish (LRU prefix cache) |
| ``vllm+lmcache`` | request FCFS | freed on finish; LMCache CPU/disk tiers write-through |
| ``infercept`` | request FCFS | per call: preserve, swap to CPU or discard, least waste |
| ``autellix`` | program-level least attained service (PLAS) | freed on finish |
| ``static-ttl`` | program FCFS | pinned 2 s (Continuum's public code) |
| ``continuum`` | program FCFS | pinned for the cost-model TTL (our connector) |
| ``tiered`` | program FCFS | LMCache tiers, layer-wise and cost-aware loads (no pins) |
| ``tiered+pins`` | program FCFS | ``tiered`` with the tier-priced TTL pins |
| ``retention-bound`` | the best of the three orders above | kept off the GPU, back at no cost |
| ``oracle`` | the best of the three orders above | never lost: GPU KV for every program |
| ``lmcache-layerwise+priority`` | program FCFS | LMCache write-through, layer-wise loads |
| ``vllm-offload`` | request FCFS | vLLM's CPU offloading connector: async loads, no disk |
| ``continuum-plugin`` | pinned, then program FCFS | 2 s until 100 samples, then the TTL |

``continuum-plugin`` is the public Continuum plugin's behaviour (docs/architecture.md, 'Peers'): a
returning turn whose program still holds a pin goes ahead of the others. Its queue also
puts preempted requests first, which vLLM's priority scheduler does not do (a preempted
request goes back by its priority); that part is not modelled.

The strongest configuration a user can assemble without us is
``lmcache-layerwise+priority``: vLLM's priority scheduling with the program's first
arrival as the priority (sent by the client), LMCache with ``use_layerwise``; no pins and
no cost-aware loads. ``COMPONENTS`` adds one mechanism at a time from ``vllm`` to
``tiered``, so each one's share of the gain can be read off one run per system.

``tiered`` is what ``serve --tiers ... --layerwise-loads`` runs on a GPU by default:
LMCache's CPU and disk tiers with layer-wise loads (``use_layerwise``), which overlap a
reload with the forward pass, a tier hit loaded only where that beats its prefill over two
turns (``ContinuumTieredConnector``, ``core.tier_model.LoadCost``), and program FCFS; no
pins, the ``none`` policy. ``tiered+pins`` adds ``policies/tiered.py``'s pins
(``--policy tiered``): with a CPU tier below, they were worth -1.8% to +0.3% of the gain
over ``vllm`` in every setting and hardware variant measured (docs/results/components/),
so the default leaves them out where a tier exists.

The oracle is the lower bound on what KV memory can buy: with memory for everything,
queue order still matters, so it runs each order (request FCFS, program FCFS, PLAS) and
keeps the one with the lowest average JCT. ``retention-bound`` is the bound on what a
retention policy can buy on the deployment's real GPU pool: every turn's KV goes to an
unbounded CPU tier that loads it back in no time, so a returning turn never recomputes or
waits for a transfer, yet it is admitted by vLLM's scheduler into the same pool. Where
it is far from the oracle, the gap is GPU memory for the requests running at once, which
no decision about KV across tool calls changes.

Autellix's priority is the program's attained service when the request arrives (vLLM
fixes a request's priority on arrival): GPU seconds of the steps the program took part in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from continuum_tiered.sim.program_run import ProgramRun, ReplayHooks


def _program_fcfs(run: ProgramRun) -> int:
    return run.seq


def _least_attained_service(run: ProgramRun) -> int:
    return int(run.attained_s * 1e6)


def _pinned_then_program_fcfs(run: ProgramRun) -> int:
    return run.seq if run.holds_pin else run.seq + (1 << 40)


PROGRAM_FCFS = ReplayHooks(priority=_program_fcfs, send_hints=True)


@dataclass(frozen=True)
class Peer:
    name: str
    scheduling_policy: str = "fcfs"
    hooks: ReplayHooks = field(default_factory=ReplayHooks)
    pin_policy: str | None = None  # ContinuumConnector's retention policy, if it has pins
    pin_options: dict[str, Any] = field(default_factory=dict)
    lmcache: bool = False
    lmcache_write_through: bool = True  # False: only what the pin policy offloads is stored
    lmcache_layerwise: bool = False  # loads overlap the forward pass (use_layerwise)
    lmcache_cost_aware: bool = False  # a hit slower to load than to prefill is recomputed
    lmcache_free: bool = False  # an unbounded CPU tier whose loads take no time
    lmcache_disk: bool = True  # a disk tier below the CPU one
    async_transfers: bool = False  # loads wait outside the step, stores on a side stream
    unlimited_kv: bool = False
    every_order: bool = False  # run each of QUEUE_ORDERS and keep the lowest average JCT

    @property
    def hybrid_kv_cache_manager(self) -> bool:
        """Whether vLLM's hybrid KV cache manager (HMA) runs: LMCache's connector does not
        support it, so a peer with LMCache tiers runs with ``--disable-hybrid-kv-cache-
        manager`` (sliding-window layers keep full-length KV); ``vllm`` and the pins-only
        peers (``ContinuumConnector`` supports it) keep it on."""
        return not self.lmcache


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("vllm"),
        Peer("vllm+lmcache", lmcache=True),
        Peer(
            "infercept",
            hooks=ReplayHooks(send_hints=True),
            pin_policy="infercept",
            lmcache=True,
            lmcache_write_through=False,
        ),
        Peer(
            "autellix",
            scheduling_policy="priority",
            hooks=ReplayHooks(priority=_least_attained_service),
        ),
        Peer(
            "static-ttl",
            scheduling_policy="priority",
            hooks=PROGRAM_FCFS,
            pin_policy="static-ttl",
            pin_options={"ttl_s": 2.0},
        ),
        Peer("continuum", scheduling_policy="priority", hooks=PROGRAM_FCFS, pin_policy="continuum"),
        Peer(
            "tiered",
            scheduling_policy="priority",
            hooks=PROGRAM_FCFS,
            lmcache=True,
            lmcache_layerwise=True,
            lmcache_cost_aware=True,
        ),
        Peer(
            "tiered+pins",
            scheduling_policy="priority",
            hooks=PROGRAM_FCFS,
            pin_policy="tiered",
            lmcache=True,
            lmcache_layerwise=True,
            lmcache_cost_aware=True,
        ),
        Peer("vllm+priority", scheduling_policy="priority", hooks=PROGRAM_FCFS),
        Peer("lmcache+priority", scheduling_policy="priority", hooks=PROGRAM_FCFS, lmcache=True),
        Peer(
            "lmcache-layerwise+priority",
            scheduling_policy="priority",
            hooks=PROGRAM_FCFS,
            lmcache=True,
            lmcache_layerwise=True,
        ),
        Peer(
            "continuum-plugin",
            scheduling_policy="priority",
            hooks=ReplayHooks(priority=_pinned_then_program_fcfs, send_hints=True),
            pin_policy="continuum",
            pin_options={"cold_start_ttl_s": 2.0},
        ),
        Peer("vllm-offload", lmcache=True, lmcache_disk=False, async_transfers=True),
        Peer("retention-bound", lmcache=True, lmcache_free=True, every_order=True),
        Peer("oracle", unlimited_kv=True, every_order=True),
    )
}


# From vllm to tiered, one mechanism at a time: (peer, what it adds to the one before).
COMPONENTS = (
    ("vllm", "baseline"),
    ("vllm+priority", "program FCFS"),
    ("lmcache+priority", "CPU/disk tiers"),
    ("lmcache-layerwise+priority", "layer-wise loads"),
    ("tiered", "cost-aware loads"),
    ("tiered+pins", "pins"),
)

# Queue orders an oracle run tries: (scheduling policy, hooks).
QUEUE_ORDERS = (
    ("fcfs", ReplayHooks()),
    ("priority", ReplayHooks(priority=_program_fcfs)),
    ("priority", ReplayHooks(priority=_least_attained_service)),
)


def get_peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(PEERS)}") from None
