"""Fidelity of the virtual-time replay: predicted vs measured average JCT on this machine.

1. Profile the demo model on this CPU (``continuum-tiered profile --device cpu --engine``):
   the replay steps as long as the vLLM engine does, not as a bare forward pass.
2. Calibrate each turn's time outside the engine against the server: run the next
   ``CALIBRATION_SLICES`` slices of programs (disjoint from the measured ones; twice as
   many, since single turns vary widely) at the same rate and take, per turn, the
   programs' time besides their tool calls (JCT less the tools' durations) minus vLLM's
   own end-to-end latency (from arrival at its input processor to its last output, read
   from ``/metrics``). That is the HTTP round trip, the API server's work and the
   client's own (streaming, and waking up late from a tool pause). On this 2-core box it
   is mostly processes waiting for cores the busy engine holds: about 15 ms per request
   on an idle server, 0.5-2 s per turn in these runs, varying with the programs (a slice
   with one 1,800-token streamed reply pays the most). It is stored as
   ``engine.request_overhead_s`` of a copy of the profile. The calibration also warms the
   server up.
3. Replay a small SWE-bench slice in real time against the same ``continuum-tiered
   serve`` on the CPU build of vLLM (real HTTP, real engine, real tool pauses).
4. Replay the same programs, arrivals and KV pool in virtual time, with the engine steps
   alone and with the calibrated round trip.
5. Print the average JCTs and the relative error (target: within 15%).

    python experiments/fidelity.py [--programs 6] [--turns 6] [--jps 0.5] [--out out/fidelity]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.agent_runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.cli import main as cli
from continuum_tiered.demo import DEMO_SHAPE
from continuum_tiered.profile import TierProfile
from continuum_tiered.server import ServerProcess, plugin_server_command, prometheus_samples
from continuum_tiered.sim.deployment import Deployment
from continuum_tiered.sim.peers import get_peer
from continuum_tiered.sim.program_run import ProgramRun
from continuum_tiered.sim.replay import ReplaySetup, replay
from continuum_tiered.tiny_model import write_tiny_llama
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram

MAX_BATCHED_TOKENS = 2048
MAX_SEQS = 64
TARGET = 0.15
PEER = "continuum"  # the retention policy on both sides
E2E = "vllm:e2e_request_latency_seconds"
CALIBRATION_SLICES = 2


@dataclass(frozen=True)
class TurnTimes:
    """Mean seconds per turn: of its program's time besides tool calls, and inside the
    engine."""

    turn_s: float
    engine_s: float

    @property
    def outside_s(self) -> float:
        return max(0.0, self.turn_s - self.engine_s)

    def row(self, label: str) -> str:
        times = (self.turn_s, self.engine_s, self.outside_s)
        return f"{label:<22}" + "".join(f"{1e3 * t:>10.0f}" for t in times)


def timed_run(
    url: str, programs: list[TraceProgram], options: RunnerOptions
) -> tuple[list[ProgramRecord], TurnTimes]:
    """The programs run against the server at ``url``; per turn, their time besides tool
    calls and vLLM's own end-to-end latency of their requests (``/metrics`` before and
    after)."""
    before = prometheus_samples(url, E2E)
    records = asyncio.run(run_programs(url, programs, options))
    after = prometheus_samples(url, E2E)
    turns = sum(len(record.turns) for record in records)
    failed = [record.error for record in records if record.error]
    served = after[f"{E2E}_count"] - before[f"{E2E}_count"]
    if failed or served != turns:
        raise RuntimeError(f"{turns} turns, {served} served by the engine; {failed}")
    engine_s = (after[f"{E2E}_sum"] - before[f"{E2E}_sum"]) / turns
    return records, TurnTimes(mean_turn_s([r.jct_s for r in records], programs), engine_s)


def virtual_turn_times(runs: list[ProgramRun], overhead_s: float) -> TurnTimes:
    """A replay's turns; the engine's part is their time less the charged round trip."""
    turn_s = mean_turn_s([run.jct_s for run in runs], [run.program for run in runs])
    return TurnTimes(turn_s, turn_s - overhead_s)


def mean_turn_s(jcts: list[float], programs: list[TraceProgram]) -> float:
    """The programs' JCTs less their tool calls' (nominal) durations, per turn."""
    tools = sum(turn.tool_duration_s for program in programs for turn in program.turns[:-1])
    return (sum(jcts) - tools) / sum(len(program.turns) for program in programs)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, default=6)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--kv-blocks", type=int, default=256)
    p.add_argument("--jps", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/fidelity"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_llama(args.out / "model", DEMO_SHAPE)
    profile = args.out / "cpu-profile.json"
    measure = ["--device", "cpu", "--quick", "--engine", "--max-tokens", "4096"]
    if cli(["profile", "--model", str(model), *measure, "--out", str(profile)]) != 0:
        return 1
    trace = [
        dataclasses.replace(program, turns=program.turns[: args.turns])
        for program in load_named_trace(
            "swebench",
            programs=(1 + CALIBRATION_SLICES) * args.programs,
            seed=args.seed,
            token_scale=args.token_scale,
        )
    ]
    programs = with_poisson_arrivals(trace[: args.programs], args.jps, args.seed)
    calibration = with_poisson_arrivals(trace[args.programs :], args.jps, args.seed)

    engine = ["--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--max-num-seqs", str(MAX_SEQS)]
    # The policy the virtual replay runs: the server's default may be another one.
    serve = ["--policy", PEER, "--profile", str(profile)]
    command = plugin_server_command(model, args.kv_blocks, *serve, *engine)
    print("real time: starting continuum-tiered serve ...", flush=True)
    # serve gives the worker the core layout it has without a connector, as the profile ran.
    with ServerProcess(command, args.out / "server.log") as server:
        options = RunnerOptions(model="tiny", send_hints=True, seed=args.seed)
        print("real time: calibrating the request round trip ...", flush=True)
        _, calibrated = timed_run(server.url, calibration, options)
        print("real time: the measured programs ...", flush=True)
        load_before = os.getloadavg()[0]
        records, measured = timed_run(server.url, programs, options)
        load_after = os.getloadavg()[0]
    real = summarize_records("continuum", args.jps, records)

    deployment = Deployment(
        model=str(model),
        device="cpu",
        num_blocks=args.kv_blocks,
        block_size=32,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_num_seqs=MAX_SEQS,
    )
    steps_only = TierProfile.load(profile)
    assert steps_only.engine is not None  # measured by --engine above
    served = args.out / "cpu-profile-served.json"
    overhead = calibrated.outside_s
    engine_steps = dataclasses.replace(steps_only.engine, request_overhead_s=overhead)
    dataclasses.replace(steps_only, engine=engine_steps).save(served)
    print("virtual time: replaying the same programs ...", flush=True)
    (steps, steps_runs), (virtual, runs) = (
        replay(get_peer(PEER), programs, ReplaySetup(deployment, str(path), args.seed), args.jps)
        for path in (profile, served)
    )
    error = virtual.avg_jct_s / real.avg_jct_s - 1
    print(f"\n{len(programs)} programs x {args.turns} turns, {args.jps} programs/s, CPU build")
    print(
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after the real run "
        f"on {os.cpu_count()} CPUs (other work on these cores inflates real times)"
    )
    print(f"\n{'ms per turn':<22}{'turn':>10}{'engine':>10}{'outside':>10}")
    print(calibrated.row("real, calibration run"))
    print(measured.row("real, measured run"))
    print(virtual_turn_times(runs, overhead).row("virtual"))
    print()
    print(f"{'':<18}{'real':>10}{'virtual':>10}{'steps only':>12}")
    for key in ("avg_jct_s", "p95_jct_s", "prefix_hit_ratio"):
        row = (getattr(summary, key) for summary in (real, virtual, steps))
        print(f"{key:<18}" + "{:>10.2f}{:>10.2f}{:>12.2f}".format(*row))
    verdict = "PASS" if abs(error) <= TARGET else "FAIL"
    print(f"{verdict}: predicted average JCT off by {error:+.1%} (target within {TARGET:.0%})")
    print(f"with the engine steps only: off by {steps.avg_jct_s / real.avg_jct_s - 1:+.1%}")
    # What the replay models, alone: the engine's time per turn (vLLM's own end-to-end
    # latency, queueing included) against the steps-only replay's.
    engine = mean_turn_s([run.jct_s for run in steps_runs], programs)
    print(
        f"engine time per turn: real {1e3 * measured.engine_s:.0f} ms (vLLM's e2e latency), "
        f"steps-only replay {1e3 * engine:.0f} ms: off by {engine / measured.engine_s - 1:+.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
