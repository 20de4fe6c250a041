"""Cluster what-ifs in virtual time: N replicas of vLLM's real scheduler behind a router."""

from __future__ import annotations

import dataclasses
import json

import pytest

from continuum_tiered.cli import main
from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.core.profile import PROFILE_VERSION, ModelShape, Tier, TierProfile
from continuum_tiered.sim.cluster import replay_cluster
from continuum_tiered.sim.peers import PEERS
from continuum_tiered.sim.routing import ClusterSpec, HashRing
from continuum_tiered.sim.simulate import ReplaySetup
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram, Turn, write_trace

SMALL_GPU = Deployment(gpu_memory_bytes=23.5e9, max_num_seqs=64)
SETUP = ReplaySetup(SMALL_GPU, None, seed=1)


@pytest.fixture(scope="module")
def programs() -> list[TraceProgram]:
    """24 short SWE-bench programs arriving fast enough to keep three replicas busy."""
    trace = load_named_trace("swebench", programs=24, seed=1, token_scale=0.05)
    return with_poisson_arrivals(trace, jps=4.0, seed=1)


def _run(peer: str, programs, routing: str, replicas: int = 3, **spec):
    return replay_cluster(PEERS[peer], programs, SETUP, 4.0, ClusterSpec(replicas, routing, **spec))


def test_program_affine_keeps_every_turn_of_a_program_on_one_replica(programs):
    run, _, _ = _run("vllm", programs, "program-affine")
    assert run.moved_turns == 0
    assert sum(1 for n in run.turns_per_replica if n) == 3  # yet programs are spread
    assert sum(run.turns_per_replica) == sum(len(p.turns) for p in programs)


def test_removing_a_replica_moves_only_its_programs():
    keys = [f"program-{i}" for i in range(2000)]
    ring = HashRing(range(8))
    before = {k: ring.node_for(k) for k in keys}
    ring.remove(3)
    after = {k: ring.node_for(k) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == 3}
    assert len({after[k] for k in moved}) > 3  # virtual nodes: spread, not to one neighbour
    assert len(moved) == pytest.approx(len(keys) / 8, rel=0.3)


def test_round_robin_moves_programs_and_they_recompute(programs):
    affine, _, _ = _run("vllm", programs, "program-affine")
    spread, _, _ = _run("vllm", programs, "round-robin")
    assert spread.moved_turns > 0
    assert spread.recomputed_tokens > 2 * affine.recomputed_tokens


def test_moved_programs_reload_from_the_shared_tier_else_recompute(programs):
    shared, _, _ = _run("tiered", programs, "round-robin")
    alone, _, _ = _run("tiered", programs, "round-robin", shared_tier=False)
    assert shared.shared_blocks_loaded > 0 and alone.shared_blocks_loaded is None
    assert shared.recomputed_tokens < alone.recomputed_tokens
    affine, _, _ = _run("tiered", programs, "program-affine")
    assert affine.shared_blocks_loaded == 0  # nothing moved: every hit is local


@pytest.mark.parametrize("peer", ["static-ttl", "tiered"])  # pins; local and shared tiers
def test_losing_a_replica_mid_run_loses_no_program_and_leaks_no_block(programs, peer):
    """Replica 0 is lost while it serves turns: they start over elsewhere, every program
    completes, and the survivors end with every block free once their pins go."""
    run, runs, engines = _run(peer, programs, "program-affine", fail_at_s=5.0)
    assert run.retried_turns > 0
    assert all(r.end_s is not None and r.turn == len(r.program.turns) for r in runs)
    assert run.summary.programs == len(programs)
    assert run.turns_per_replica[0] < sum(run.turns_per_replica) / 6
    for engine in engines[1:]:
        assert not engine.busy()
        if engine.pin_connector is not None:
            engine.pin_connector.pins.release_all(ReleaseReason.SHUTDOWN)
        pool = engine.driver.block_pool
        assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # less the null block
    if peer == "static-ttl":
        assert run.summary.pins_created > 0


def _simple_profile(path, remote: Tier) -> str:
    """Prefill 10 ms + 1 ms per token, decode 5 ms a step; local tiers that take no time;
    the shared tier as given."""
    profile = TierProfile(
        version=PROFILE_VERSION,
        model=ModelShape.from_hf_config(Deployment().hf_config(), name=Deployment().model),
        device="cuda",
        tiers={"cpu": Tier("cpu", 1e15, 0.0), "disk": Tier("disk", 1e15, 0.0), "remote": remote},
        prefill_coeffs=(0.010, 0.001, 0.0),
        source="test",
        decode_coeffs=(0.005, 0.0, 0.0),
    )
    profile.save(path)
    return str(path)


def test_a_moved_turn_pays_the_shared_tier_transfer(tmp_path):
    """Round-robin puts turn 2 on the other replica: its 32-token prefix comes from the
    shared tier in 1 s plus the tier's 0.1 s latency, then 16 tokens are prefilled."""
    two_blocks = 32 * Deployment().kv_bytes_per_token()
    remote = Tier("remote", two_blocks, 0.1, write_bandwidth_bytes_per_s=1e15)
    setup = ReplaySetup(Deployment(), _simple_profile(tmp_path / "p.json", remote))
    program = TraceProgram("p", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)))
    spec = ClusterSpec(2, "round-robin")
    run, (p,), _ = replay_cluster(PEERS["vllm+lmcache"], [program], setup, 1.0, spec)
    assert run.moved_turns == 1 and run.shared_blocks_loaded == 2
    assert p.jct_s == pytest.approx(0.047 + 1.0 + 1.1 + 0.026 + 0.005, rel=1e-4)
    alone = dataclasses.replace(spec, shared_tier=False)
    _, (p,), _ = replay_cluster(PEERS["vllm+lmcache"], [program], setup, 1.0, alone)
    assert p.jct_s == pytest.approx(0.047 + 1.0 + 0.058 + 0.005, rel=1e-4)  # recomputed


def test_simulate_cli_runs_a_cluster(tmp_path):
    trace = tmp_path / "trace.jsonl"
    turns = (Turn(32, 2, "ls", 0.5), Turn(40, 2, None, 0.0))
    write_trace([TraceProgram(f"p{i}", turns, arrival_s=0.1 * i) for i in range(4)], trace)
    out = tmp_path / "out"
    args = ["simulate", "--trace", str(trace), "--policies", "vllm,tiered", "--jps", "2"]
    cluster = ["--replicas", "2", "--routing", "cache-aware", "--fail-replica-at", "0.3"]
    assert main([*args, "--programs", "4", *cluster, "--out", str(out)]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [(r["policy"], r["routing"], r["replicas"]) for r in runs] == [
        ("vllm", "cache-aware", 2),
        ("tiered", "cache-aware", 2),
    ]
    assert all(r["programs"] == 4 and r["fail_at_s"] == 0.3 for r in runs)
    assert "| tiered | cache-aware |" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replicas", "0"], "--replicas must be at least 1, got 0"),
        (["--replicas", "2", "--routing", "magic"], "unknown routing 'magic'"),
        (["--fail-replica-at", "5"], "--fail-replica-at needs at least 2 replicas"),
    ],
)
def test_bad_cluster_options_are_clear_errors(options, message, capsys):
    assert main(["simulate", *options]) == 2
    assert message in capsys.readouterr().err
