"""The virtual-time replay: vLLM's real scheduler, a modelled GPU clock."""

from __future__ import annotations

import dataclasses
import json

import pytest

from continuum_tiered.cli import main
from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.profile import (
    PROFILE_VERSION,
    EngineSteps,
    ModelShape,
    Tier,
    TierProfile,
)
from continuum_tiered.core.tier_model import LRUTier, TierStore
from continuum_tiered.sim.peers import PEERS
from continuum_tiered.sim.scheduler_driver import build_vllm_config
from continuum_tiered.sim.simulate import ReplaySetup, driver_config, replay
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram, Turn, write_trace
from continuum_tiered.vllm.connectors.config import ConnectorOptions

DEPLOYMENT = Deployment()


@pytest.fixture(scope="module")
def simple_profile(tmp_path_factory) -> str:
    """Round numbers: prefill 10 ms + 1 ms per token, decode 5 ms per step."""
    hf = DEPLOYMENT.hf_config()
    profile = TierProfile(
        version=PROFILE_VERSION,
        model=ModelShape.from_hf_config(hf, name=DEPLOYMENT.model),
        device="cuda",
        tiers={},
        prefill_coeffs=(0.010, 0.001, 0.0),
        source="test",
        decode_coeffs=(0.005, 0.0, 0.0),
    )
    path = tmp_path_factory.mktemp("profile") / "simple.json"
    profile.save(path)
    return str(path)


def test_a_two_turn_program_takes_the_hand_computed_time(simple_profile):
    program = TraceProgram("p", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    summary, (run,) = replay(PEERS["vllm"], [program], ReplaySetup(DEPLOYMENT, simple_profile), 1)
    # Turn 1: prefill 32 tokens (0.010 + 0.032), one decode step (0.005): ends at 0.047.
    # Tool: 1 s. Turn 2 at 1.047: 32 of its 48 tokens hit the prefix cache (two full
    # 16-token blocks of the 34-token context), prefill 16 (0.026), decode (0.005).
    assert run.jct_s == pytest.approx(0.047 + 1.0 + 0.031)
    assert run.hit_tokens == 32
    assert summary.prefix_hit_ratio == pytest.approx(32 / (32 + 48))
    # KV held per step (16-token blocks): 2 for the 32-token prefill, 3 once the first
    # token is decoded; turn 2: 3 while prefilling tokens 33-48, 4 for its decode.
    held = 2 * 0.042 + 3 * 0.005 + 3 * 0.026 + 4 * 0.005
    assert summary.mean_kv_blocks == pytest.approx(held / (0.047 + 0.031))


def test_measured_engine_steps_replace_the_model_only_fits(simple_profile, tmp_path):
    """A profile that timed the serving engine's steps is replayed at those step times."""
    engine = EngineSteps(prefill_coeffs=(0.020, 0.002, 0.0), decode_coeffs=(0.010, 0.0, 0.0))
    path = tmp_path / "engine.json"
    dataclasses.replace(TierProfile.load(simple_profile), engine=engine).save(path)
    program = TraceProgram("p", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    _, (run,) = replay(PEERS["vllm"], [program], ReplaySetup(DEPLOYMENT, str(path)), 1)
    # As above at the engine's costs: prefill 32 (0.020 + 0.064), decode (0.010); tool;
    # prefill 16 after the 32-token hit (0.020 + 0.032), decode (0.010).
    assert run.jct_s == pytest.approx(0.094 + 1.0 + 0.062)


def test_the_request_overhead_delays_each_turn_seen_by_its_program(simple_profile, tmp_path):
    """A measured round trip outside engine steps is paid once per turn: after the first
    turn's last step its tool call starts that much later, and the program ends that much
    after the last turn's last step."""
    engine = EngineSteps((0.010, 0.001, 0.0), (0.005, 0.0, 0.0), request_overhead_s=0.1)
    path = tmp_path / "overhead.json"
    dataclasses.replace(TierProfile.load(simple_profile), engine=engine).save(path)
    program = TraceProgram("p", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    _, (run,) = replay(PEERS["vllm"], [program], ReplaySetup(DEPLOYMENT, str(path)), 1)
    # The steps of the first test (0.047, then 0.031 after the tool), one round trip each.
    assert run.jct_s == pytest.approx(0.047 + 0.1 + 1.0 + 0.031 + 0.1)


def _prefix_evicted_during_a_tool_call(
    profile: str, tmp_path, disk_read_s: float = 10.0
) -> tuple[ReplaySetup, list]:
    """A's turn-1 KV goes to a disk tier (no CPU tier) that needs ``disk_read_s`` to read
    its two blocks back (writing them is fast); B fills the 7-block GPU pool during A's
    tool call, evicting A's cached prefix."""
    kv_bytes = DEPLOYMENT.kv_bytes_per_token()
    slow_disk = {
        "cpu": Tier("cpu", 1e12, 0.0),
        "disk": Tier("disk", 32 * kv_bytes / disk_read_s, 0.0, write_bandwidth_bytes_per_s=1e12),
    }
    path = tmp_path / "slow-disk.json"
    dataclasses.replace(TierProfile.load(profile), tiers=slow_disk).save(path)
    setup = ReplaySetup(dataclasses.replace(DEPLOYMENT, num_blocks=8, cpu_tier_bytes=0), str(path))
    a = TraceProgram("a", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    b = TraceProgram("b", (Turn(100, 2, None, 0.0),), arrival_s=0.5)
    return setup, [a, b]


def _jct_of_first(peer, setup: ReplaySetup, programs: list) -> float:
    _, runs = replay(peer, programs, setup, 1)
    assert runs[0].program.program_id == "a"
    return runs[0].jct_s


def test_a_tier_hit_slower_to_load_than_to_prefill_is_recomputed(simple_profile, tmp_path):
    """Stock LMCache loads every hit; ``tiered`` (cost-aware) recomputes one whose transfer
    is slower."""
    setup, programs = _prefix_evicted_during_a_tool_call(simple_profile, tmp_path)

    def jct_of_a(cost_aware: bool) -> float:
        peer = dataclasses.replace(PEERS["vllm+lmcache"], lmcache_cost_aware=cost_aware)
        return _jct_of_first(peer, setup, programs)

    # Turn 1 as in the two-turn case (0.047), the tool (1 s), then turn 2 either loads 32
    # tokens from disk (10 s) and prefills 16 (0.026), or prefills all 48 (0.058); decode.
    # Storing the blocks at 1 TB/s adds microseconds (rel=1e-4).
    assert jct_of_a(cost_aware=False) == pytest.approx(0.047 + 1.0 + 10.0 + 0.026 + 0.005)
    assert jct_of_a(cost_aware=True) == pytest.approx(0.047 + 1.0 + 0.058 + 0.005, rel=1e-4)


def test_cost_aware_loads_count_promotion_and_what_a_layerwise_load_hides(simple_profile, tmp_path):
    """A's 32-token disk hit against its 32 ms prefill, with ``tiered``'s decision: read in
    40 ms it is loaded (the load also moves it to the CPU tier for the next turn, which a
    recompute would not); read in 80 ms it is recomputed, unless a layer-wise load runs it
    under the 16 new tokens' compute."""

    def jct_of_a(disk_read_s: float, layerwise: bool) -> float:
        setup, programs = _prefix_evicted_during_a_tool_call(simple_profile, tmp_path, disk_read_s)
        peer = dataclasses.replace(
            PEERS["vllm+lmcache"], lmcache_cost_aware=True, lmcache_layerwise=layerwise
        )
        return _jct_of_first(peer, setup, programs)

    turn_1_and_tool, decode = 0.047 + 1.0, 0.005
    # Loaded before the step, then the 16 new tokens (0.026).
    assert jct_of_a(0.040, False) == pytest.approx(
        turn_1_and_tool + 0.040 + 0.026 + decode, rel=1e-4
    )
    recompute = turn_1_and_tool + 0.058 + decode
    assert jct_of_a(0.080, False) == pytest.approx(recompute, rel=1e-4)
    # The step: the 80 ms read, then the last of its 32 layers' compute (0.026 / 32).
    layerwise = turn_1_and_tool + 0.080 + 0.026 / 32 + decode
    assert jct_of_a(0.080, True) == pytest.approx(layerwise, rel=1e-4)


def test_the_retention_bound_brings_back_every_prefix_at_no_cost(simple_profile, tmp_path):
    """The bound on retention keeps A's prefix though neither the GPU pool nor the
    profile's tiers could, and loads it in no time: turn 2 prefills only its 16 new tokens."""
    setup, programs = _prefix_evicted_during_a_tool_call(simple_profile, tmp_path)
    jct = _jct_of_first(PEERS["retention-bound"], setup, programs)
    assert jct == pytest.approx(0.047 + 1.0 + 0.026 + 0.005)


@pytest.fixture(scope="module")
def contended_runs():
    """20 short SWE-bench programs on a GPU with little room for KV: programs compete."""
    small_gpu = Deployment(gpu_memory_bytes=23.5e9, max_num_seqs=64)
    programs = load_named_trace("swebench", programs=20, seed=1, token_scale=0.05)
    timed = with_poisson_arrivals(programs, jps=2.0, seed=1)
    setup = ReplaySetup(small_gpu, None, seed=1)
    return {name: replay(peer, timed, setup, 2.0)[0] for name, peer in PEERS.items()}


def test_both_bounds_beat_every_policy(contended_runs):
    """The retention bound (every KV kept at no cost, in the real pool) beats every policy
    that runs in that pool. The oracle (GPU memory for everything) does too, within 0.1%:
    running fewer requests at once makes each step faster, so a run in the real pool can
    edge it out (the retention bound does here by 0.01%, ``tiered`` by 0.004%)."""
    oracle, bound = contended_runs["oracle"], contended_runs["retention-bound"]
    policies = {k: v for k, v in contended_runs.items() if k not in ("oracle", "retention-bound")}
    for name, summary in policies.items():
        assert bound.avg_jct_s <= summary.avg_jct_s * (1 + 1e-9), name
        assert oracle.avg_jct_s <= summary.avg_jct_s * (1 + 1e-3), name
    # The contention is real: plain vLLM loses prefixes the oracle keeps, and the LMCache
    # tiers bring most of them back.
    vllm, lmcache = contended_runs["vllm"], contended_runs["vllm+lmcache"]
    assert vllm.prefix_hit_ratio < lmcache.prefix_hit_ratio


def test_tier_store_demotes_to_disk_and_promotes_on_a_hit():
    store = TierStore(LRUTier(2), LRUTier(3))
    for key in "abcd":
        store.store(key)
    assert store.lookup(list("abcd")) == ["disk", "disk", "cpu", "cpu"]
    store.store("a")  # a disk hit is promoted, pushing the CPU tier's oldest down
    assert store.lookup(["a", "c", "d"]) == ["cpu", "disk", "cpu"]
    for key in "efgh":
        store.store(key)
    assert store.lookup(["b"]) == []  # fell off the disk tier
    assert store.tier_of_prefix(2) == "cpu" and store.tier_of_prefix(5) == "disk"
    assert store.tier_of_prefix(6) is None


def test_the_same_seed_gives_identical_results(contended_runs):
    small_gpu = Deployment(gpu_memory_bytes=23.5e9, max_num_seqs=64)
    programs = load_named_trace("swebench", programs=20, seed=1, token_scale=0.05)
    timed = with_poisson_arrivals(programs, jps=2.0, seed=1)
    again, _ = replay(PEERS["continuum"], timed, ReplaySetup(small_gpu, None, seed=1), 2.0)
    assert again == contended_runs["continuum"]


def test_simulate_cli_writes_summary_table_and_plots(tmp_path, simple_profile):
    trace = tmp_path / "trace.jsonl"
    write_trace([TraceProgram("p", (Turn(32, 2, "ls", 0.5), Turn(40, 2, None, 0.0)))], trace)
    out = tmp_path / "out"
    options = ["--policies", "vllm,oracle", "--jps", "1,2", "--programs", "1"]
    code = main(
        [
            "simulate",
            "--trace",
            str(trace),
            *options,
            "--profile",
            simple_profile,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["policy"], r["jps"]) for r in summary["runs"]] == [
        ("vllm", 1.0),
        ("oracle", 1.0),
        ("vllm", 2.0),
        ("oracle", 2.0),
    ]
    assert "| vllm | 1 |" in (out / "summary.md").read_text()
    assert (out / "jct_vs_load.png").stat().st_size > 0 and (out / "jct_cdf.png").exists()


def test_simulate_rejects_a_broken_trace_naming_the_line(tmp_path, capsys):
    trace = tmp_path / "broken.jsonl"
    good = {"program_id": "a", "turns": [{"prompt_tokens": 10, "output_tokens": 1}]}
    bad = {"program_id": "b", "turns": [{"prompt_tokens": 10, "output_tokens": -1}]}
    trace.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    assert main(["simulate", "--trace", str(trace), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "output_tokens" in err


def test_unknown_policy_is_a_clear_error(capsys):
    assert main(["simulate", "--policies", "vllm,magic"]) == 2
    assert "unknown policy 'magic'" in capsys.readouterr().err


def _tiered_setup(profile: str, tmp_path, cpu: Tier, disk: Tier, **deployment) -> ReplaySetup:
    path = tmp_path / "tiers.json"
    dataclasses.replace(TierProfile.load(profile), tiers={"cpu": cpu, "disk": disk}).save(path)
    return ReplaySetup(dataclasses.replace(DEPLOYMENT, **deployment), str(path))


ONE_TURN = [TraceProgram("p", (Turn(32, 2, None, 0.0),), arrival_s=0.0)]
TWO_BLOCKS = 32 * DEPLOYMENT.kv_bytes_per_token()


def test_write_through_stores_cost_the_step_that_computes_them(simple_profile, tmp_path):
    """The prefill step completes two blocks; copying them off the GPU at one block per
    0.5 s makes that step 1 s longer without layer-wise transfers, and overlaps the
    forward pass (0.042 s, 32 layers) with them."""
    cpu = Tier("cpu", 1e12, 0.0, write_bandwidth_bytes_per_s=TWO_BLOCKS)
    setup = _tiered_setup(simple_profile, tmp_path, cpu, Tier("disk", 1e12, 0.0))
    summary, (run,) = replay(PEERS["vllm+lmcache"], ONE_TURN, setup, 1)
    assert run.jct_s == pytest.approx(0.042 + 1.0 + 0.005)
    assert summary.stores["blocks_stored"] == 2 and summary.stores["blocks_dropped"] == 0
    layerwise = dataclasses.replace(PEERS["vllm+lmcache"], lmcache_layerwise=True)
    _, (run,) = replay(layerwise, ONE_TURN, setup, 1)
    assert run.jct_s == pytest.approx(1.0 + 0.042 / 32 + 0.005)
    # Without stores (vLLM alone) the copies are not made at all.
    _, (run,) = replay(PEERS["vllm"], ONE_TURN, setup, 1)
    assert run.jct_s == pytest.approx(0.047)


def test_a_disk_that_cannot_keep_up_drops_stores_and_reports_the_delay(simple_profile, tmp_path):
    """Every stored block is also written to disk, at one block per 10 s here. A CPU tier
    of two blocks is then full of chunks waiting for their write, so LMCache cannot
    allocate the other four blocks of a 100-token prompt: they are dropped."""
    slow_write = Tier("disk", 1e12, 0.0, write_bandwidth_bytes_per_s=TWO_BLOCKS / 20)
    setup = _tiered_setup(
        simple_profile, tmp_path, Tier("cpu", 1e12, 0.0), slow_write, cpu_tier_bytes=TWO_BLOCKS
    )
    program = [TraceProgram("p", (Turn(100, 2, None, 0.0),), arrival_s=0.0)]
    summary, _ = replay(PEERS["vllm+lmcache"], program, setup, 1)
    stores = summary.stores
    assert (stores["blocks_stored"], stores["blocks_dropped"]) == (2, 4)
    assert stores["disk_blocks_written"] == 2
    assert stores["disk_write_delay_max_s"] == pytest.approx(20.0)


def test_a_disk_read_under_a_write_backlog_is_slower(simple_profile, tmp_path):
    """A's prefix is evicted from the GPU and comes back from disk while B's stores keep
    the disk writing: the read runs at the read-under-write figure. Writes take 0.25 s
    a block: A's two are on disk by 0.55 s, B's six (from 0.6 s) until 2.1 s, and A
    returns at 1.05 s."""

    def jct_of_a(read_under_write: float) -> float:
        disk = Tier(
            "disk",
            TWO_BLOCKS,  # 1 s for A's two blocks alone
            0.0,
            write_bandwidth_bytes_per_s=TWO_BLOCKS / 0.5,
            duplex_bandwidth_bytes_per_s=read_under_write,
        )
        setup = _tiered_setup(
            simple_profile, tmp_path, Tier("cpu", 1e12, 0.0), disk, num_blocks=8, cpu_tier_bytes=0
        )
        a = TraceProgram("a", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
        b = TraceProgram("b", (Turn(100, 2, None, 0.0),), arrival_s=0.5)
        _, runs = replay(PEERS["vllm+lmcache"], [a, b], setup, 1)
        return runs[0].jct_s

    alone, contended = jct_of_a(TWO_BLOCKS), jct_of_a(TWO_BLOCKS / 4)
    assert contended == pytest.approx(alone + 3.0, rel=1e-3)


def test_vllm_offload_loads_asynchronously_without_stalling_the_batch(simple_profile, tmp_path):
    """A's two prefix blocks are evicted from the GPU by C, and come back from the CPU tier
    over a link that needs 1 s for them, while B decodes. LMCache's synchronous load holds
    the whole step (B waits too); vLLM's offloading connector loads while B runs, and only
    A waits."""
    cpu = Tier("cpu", TWO_BLOCKS, 0.0, write_bandwidth_bytes_per_s=1e12)
    setup = _tiered_setup(simple_profile, tmp_path, cpu, Tier("disk", 1e12, 0.0), num_blocks=22)
    a = TraceProgram("a", (Turn(32, 2, "grep", 1.0), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    c = TraceProgram("c", (Turn(320, 2, None, 0.0),), arrival_s=0.1)
    b = TraceProgram("b", (Turn(100, 200, None, 0.0),), arrival_s=0.5)

    def jcts(peer: str) -> dict[str, float]:
        _, runs = replay(PEERS[peer], [a, b, c], setup, 1)
        assert runs[0].hit_tokens == 32  # A's prefix came back from the CPU tier
        return {run.program.program_id: run.jct_s for run in runs}

    sync, offload = jcts("vllm+lmcache"), jcts("vllm-offload")
    assert offload["a"] >= 0.047 + 1.0 + 1.0  # A still waits for its load
    assert offload["b"] < sync["b"] - 0.9  # but B no longer does


def test_continuum_plugin_pins_two_seconds_until_it_has_samples(simple_profile):
    """The public plugin's cold start pins every tool call for 2 s, so A's second turn
    after a 1.5 s tool finds its program holding a pin (and would be queued ahead of
    pinless programs). ``continuum``'s cold start, ln(benefit) for the tiny benefit of a
    32-token prefix, pins nothing."""
    a = TraceProgram("a", (Turn(32, 2, "grep", 1.5), Turn(48, 2, None, 0.0)), arrival_s=0.0)
    setup = ReplaySetup(DEPLOYMENT, simple_profile)
    _, (plugin,) = replay(PEERS["continuum-plugin"], [a], setup, 1)
    _, (plain,) = replay(PEERS["continuum"], [a], setup, 1)
    assert plugin.holds_pin and not plain.holds_pin


def test_the_replay_hands_the_connector_the_profile_it_loaded(simple_profile):
    """The pin policy's connector gets the replay's profile itself, not its name to read
    again: a profile that is no file (here one changed after loading) is the one it uses."""
    setup = ReplaySetup(DEPLOYMENT, simple_profile)
    loaded = dataclasses.replace(setup.profile(), prefill_coeffs=(0.5, 0.0, 0.0))
    peer = PEERS["continuum"]
    config = driver_config(peer, setup, ONE_TURN, loaded)
    assert config.kv_transfer_config["kv_connector_extra_config"]["profile"] == loaded.to_json()
    options = ConnectorOptions.from_vllm_config(build_vllm_config(config))
    assert options.profile == loaded
