"""N replicas of one system behind a router, in virtual time (``simulate --replicas N``).

Each replica is the single-replica replay's engine (vLLM's real scheduler with the
system's connectors, :func:`.simulate.build_engine`); all of them advance on one virtual
clock (:class:`.virtual_engine.Replicas`), and every turn is routed as it arrives
(:mod:`.routing`). A program the router moves pays what it would pay: its pin and its
entries in the old replica's CPU and disk tiers stay there (the pin until its TTL runs
out or that replica needs the memory); the new replica finds the prefix in the shared
tier where the cluster has one (systems with LMCache: its remote backend,
:mod:`.shared_tier`), else recomputes it.

Losing a replica (``ClusterSpec.fail_at_s``): replica ``FAILED_REPLICA`` is dropped with
everything it held (running and waiting requests, pins, its own tiers, its shared-tier
writes not yet done); the turns it was serving start over at once on the replicas the
router now picks (program-affine: the ring without it), as do all later turns. Failure
detection and the client's retry take no time here, and a replica's clock can be up to
one step past the failure when it is dropped (the loop's granularity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from continuum_tiered.core.metrics import RunSummary
from continuum_tiered.sim.peers import Peer
from continuum_tiered.sim.program_run import ProgramRun
from continuum_tiered.sim.routing import FAILED_REPLICA, ClusterSpec, Router
from continuum_tiered.sim.shared_tier import DEFAULT_SHARED_TIER_BYTES, SharedTier, shared_tier_of
from continuum_tiered.sim.simulate import ReplaySetup, build_engine, summarize_engines
from continuum_tiered.sim.virtual_engine import Arrivals, Replicas, VirtualEngine
from continuum_tiered.traces.model import TraceProgram


@dataclass(frozen=True)
class ClusterRun:
    summary: RunSummary
    spec: ClusterSpec
    moved_turns: int  # routed elsewhere than the program's previous turn
    retried_turns: int  # started over after their replica was lost
    recomputed_tokens: int  # prompt tokens prefilled: found neither on the GPU nor in a tier
    shared_blocks_loaded: int | None  # None: no shared tier
    shared_blocks_written: int | None
    turns_per_replica: list[int]

    def to_json(self) -> dict[str, object]:
        fields = {k: v for k, v in asdict(self).items() if k not in ("summary", "spec")}
        return {**self.summary.to_json(), **asdict(self.spec), **fields}


class _Routing:
    """The router, counting where each program's turns went."""

    def __init__(self, router: Router, replicas: int):
        self.router = router
        self.home: dict[int, int] = {}  # program seq -> replica of its latest turn
        self.moved = 0
        self.turns = [0] * replicas

    def __call__(self, run: ProgramRun, live: list[VirtualEngine]) -> VirtualEngine:
        chosen = self.router.route(run, live)
        if self.home.setdefault(run.seq, chosen.replica) != chosen.replica:
            self.moved += 1
            self.home[run.seq] = chosen.replica
        self.turns[chosen.replica] += 1
        return chosen


def uses_shared_tier(peer: Peer) -> bool:
    """LMCache's remote backend: for peers running LMCache itself (not vLLM's own
    offloading, nor the free tier of the retention bound)."""
    return peer.lmcache and not peer.async_transfers and not peer.lmcache_free


def replay_cluster(
    peer: Peer,
    programs: list[TraceProgram],
    setup: ReplaySetup,
    jps: float,
    spec: ClusterSpec,
    on_program_done=lambda: None,
) -> tuple[ClusterRun, list[ProgramRun], list[VirtualEngine]]:
    """The run's figures, its programs, and its replicas as they ended (a lost one too)."""
    engines = [build_engine(peer, setup, programs, replica=i) for i in range(spec.replicas)]
    shared = None
    if spec.shared_tier and uses_shared_tier(peer):
        block_bytes = setup.deployment.block_size * setup.deployment.kv_bytes_per_token()
        tier = shared_tier_of(setup.profile())
        shared = SharedTier(tier, block_bytes, DEFAULT_SHARED_TIER_BYTES)
        for engine in engines:
            assert engine.lmcache is not None
            engine.lmcache.bind_shared_tier(shared, engine.replica)
    routing = _Routing(spec.router(), spec.replicas)
    arrivals = Arrivals(programs)
    replicas = Replicas(engines, arrivals, routing)
    retried = 0
    if spec.fail_at_s is not None:
        replicas.run(on_program_done, until_s=spec.fail_at_s)
        if shared is not None:
            shared.lose_replica(FAILED_REPLICA, spec.fail_at_s)
        retried = len(replicas.remove(engines[FAILED_REPLICA], spec.fail_at_s))
    replicas.run(on_program_done)
    runs = arrivals.runs
    run = ClusterRun(
        summary=summarize_engines(peer.name, jps, runs, engines),
        spec=spec,
        moved_turns=routing.moved,
        retried_turns=retried,
        recomputed_tokens=sum(r.prompt_tokens - r.hit_tokens for r in runs),
        shared_blocks_loaded=None if shared is None else shared.blocks_loaded,
        shared_blocks_written=None if shared is None else shared.blocks_written,
        turns_per_replica=routing.turns,
    )
    return run, runs, engines


CLUSTER_COLUMNS = (
    ("avg JCT s", lambda r: r.summary.avg_jct_s),
    ("p95 s", lambda r: r.summary.p95_jct_s),
    ("programs/h", lambda r: r.summary.throughput_programs_per_h),
    ("prefix hit", lambda r: r.summary.prefix_hit_ratio),
    ("moved turns", lambda r: r.moved_turns),
    ("retried turns", lambda r: r.retried_turns),
    ("recomputed Mtok", lambda r: r.recomputed_tokens / 1e6),
    ("shared-tier blocks loaded", lambda r: r.shared_blocks_loaded),
)


def cluster_table(runs: list[ClusterRun]) -> str:
    header = "| policy | routing | replicas | lost at s | jps | "
    header += " | ".join(title for title, _ in CLUSTER_COLUMNS) + " |"
    rule = "|---" * (5 + len(CLUSTER_COLUMNS)) + "|"
    rows = []
    for r in runs:
        spec = r.spec
        cells = [r.summary.policy, spec.routing, spec.replicas, spec.fail_at_s, r.summary.jps]
        cells += [value(r) for _, value in CLUSTER_COLUMNS]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join([header, rule, *rows])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
