"""Fidelity of the virtual-time replay against vLLM's engine alone, at three loads.

1. Profile the demo model on this CPU (``continuum-tiered profile --device cpu --engine``):
   the replay steps as long as the vLLM engine does, not as a bare forward pass.
2. At each load (programs per second: light, medium, saturating on this machine), replay a
   small SWE-bench slice in real time on vLLM's engine in this process
   (:mod:`continuum_tiered.lab.in_process_replay`: ``LLMEngine``, no HTTP server and no client on
   the cores; the plugin's connector configured as ``continuum-tiered serve`` configures
   it; tool calls are wall-clock pauses). A fresh engine per load: no prefix or policy
   state carries over from one load to the next, as in the virtual replay.
3. Replay the same programs, arrivals, seed and KV pool in virtual time with the profile's
   engine steps and no request overhead term; report average JCT real vs virtual and the
   relative error (target: within 10% at each load).
   A diagnostic beside it: just before and after each real run, one request alone on the
   idle engine (a 1,024-token prefill and 32 decode steps, median of three) is timed
   against what the profile's steps predict for it. On a machine shared with other work
   the ratio moves from run to run; the virtual replay with every step that much longer
   ("virt x probe") shows how much of the error that accounts for. The factor is measured
   apart from the programs, never fitted to their JCTs.
4. The HTTP round trip, its own term: the same programs at the medium load through
   ``continuum-tiered serve`` (real HTTP, streamed replies, the client in this process);
   per turn, their JCT less the engine-alone replay's, and the time outside vLLM's own
   end-to-end latency (``/metrics``).
   Then a diagnostic: the medium load again, on both sides, with the connector's policy
   ``none`` (the same connector and program FCFS, no pins).
5. Print the table; write ``results.json`` and ``fidelity.png`` to ``--out``.

    python experiments/fidelity.py [--programs 6] [--turns 6] [--jps 0.1,0.3,2]
        [--profile out/fidelity/cpu-profile.json] [--out out/fidelity]

Measured on this 2-core machine, 2026-12-01, while other sessions' simulations and tests
kept the 1-minute load average at 6-9 (defaults: 6 programs x 6 turns, tokens x0.25, KV
pool 256 blocks, policy continuum; ~13-15 min a run, 4 of them profiling). Three runs,
average JCT real (engine alone) vs virtual, error, and with the steps scaled by the probe:

    run  load        jps   real s  virtual s  error    probe  virt x probe
    1    light       0.1   11.34   10.85      -4.4%    -      -
    1    medium      0.3   26.34   18.65      -29.2%   -      -
    1    saturating  2     17.02   20.01      +17.6%   -      -
    2    light       0.1   11.24   12.71      +13.1%   1.15   +35.6%
    2    medium      0.3   27.37   22.72      -17.0%   1.19   -3.6%
    2    saturating  2     18.17   23.38      +28.7%   1.35   +65.3%
    3    light       0.1   11.44   21.22      +85.5%   0.65   +17.7%
    3    medium      0.3   21.07   26.20      +24.3%   0.92   +18.4%
    3    saturating  2     18.64   28.01      +50.3%   0.66   +2.7%
    3    no pins     0.3   18.71   26.60      +42.1%   0.62   +1.1%

Not within 10% at any run's every load. Why, plainly:

- The machine's speed, not the model, dominates. The real JCTs at a load agree across runs
  (light 11.2-11.4 s, saturating 17.0-18.6 s), but each run's profile was measured in a
  different spell of the shared machine: the probe found the engine 0.6x to 1.75x the
  profile's time (within one run, 1.75 before and 0.95 after the saturating load), and
  two profiles half an hour apart differ by up to 2x in the decode KV term. The same
  programs at the light load came out -4%, +13% and +86%. Scaled by the probe (measured
  apart from the programs), run 3 is within 3% at saturation and without pins, 18% at the
  other two loads; run 2's probe moved too much during its runs for one factor to hold.
- One systematic part remains, from the pins: at the medium load the real engine is
  slower with the continuum policy than without pins ("no pins": the medium load with the
  connector's policy none; run 3: 21.07 vs 18.71 s; run 2 and a run without pins right
  after it: 27.37 vs 18.86 s), while the virtual replay predicts no difference (26.20 vs
  26.60 s). With pins, returning turns wait less for their first
  token (366 vs 428 ms per turn) but take longer after it (2.59 vs 2.13 s per turn): the
  real engine pays for the batches the pins create, or for the connector's per-step work
  while pins exist, more than the step-time model charges. Which of the two is not
  established here; timing each engine step against the model's prediction for the same
  batch would settle it.
- The HTTP round trip at the medium load: the served average JCT less the engine-alone
  one came out +101, -328 and -54 ms per turn (the two runs minutes apart on a machine
  whose speed drifts); the time outside vLLM's end-to-end latency was 176-1,472 ms per
  turn. The engine-alone replay carries no such term, and the virtual replay ran without
  one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from vllm.v1.engine.llm_engine import LLMEngine

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.metrics import RunSummary
from continuum_tiered.core.plots import pyplot
from continuum_tiered.core.profile import TierProfile
from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
)
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.experiment import DEMO_SHAPE
from continuum_tiered.lab.in_process_replay import (
    InProcessSetup,
    RealTimeReplay,
    served_engine,
    timed_request,
)
from continuum_tiered.profiling import cli as profiling_cli
from continuum_tiered.replay.runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.sim.peers import PROGRAM_FCFS, Peer, get_peer
from continuum_tiered.sim.simulate import ReplaySetup, replay
from continuum_tiered.sim.step_time import StepTimeModel
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram

MAX_BATCHED_TOKENS = 2048
MAX_SEQS = 64
TARGET = 0.10
PEER = "continuum"  # the retention policy on both sides
# The diagnostic beside it: the same connector and program FCFS without pins.
NO_PINS = Peer("program-fcfs", scheduling_policy="priority", hooks=PROGRAM_FCFS, pin_policy="none")
PEERS = {peer.pin_policy: peer for peer in (get_peer(PEER), NO_PINS)}  # by connector policy
E2E = "vllm:e2e_request_latency_seconds"
LOAD_NAMES = ("light", "medium", "saturating")
HTTP_LOAD = 1  # the load whose programs also run through the HTTP server
PROBE = (1024, 33)  # the speed probe's prompt and output tokens: one prefill, 32 decodes


@dataclass(frozen=True)
class LoadResult:
    """One load: the engine-alone replay in real time and the virtual replay."""

    name: str
    jps: float
    real: RunSummary
    virtual: RunSummary
    records: list[ProgramRecord]  # the real run's, turn by turn
    virtual_jcts: list[float]
    load_average: tuple[float, float]  # 1-minute load average before and after the real run
    speed: float  # the probe's time on the engine over the profile's, around the real run
    scaled: RunSummary  # the virtual replay with every step ``speed`` times as long

    @property
    def real_jcts(self) -> list[float]:
        return [record.jct_s for record in self.records]

    @property
    def error(self) -> float:
        return self.virtual.avg_jct_s / self.real.avg_jct_s - 1

    @property
    def scaled_error(self) -> float:
        return self.scaled.avg_jct_s / self.real.avg_jct_s - 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "jps": self.jps,
            "real": self.real.to_json(),
            "virtual": self.virtual.to_json(),
            "avg_jct_error": self.error,
            "load_average_1m": list(self.load_average),
            "probe_over_profile": self.speed,
            "virtual_steps_scaled_by_probe": self.scaled.to_json(),
            "scaled_avg_jct_error": self.scaled_error,
            "real_jcts_s": self.real_jcts,
            "virtual_jcts_s": self.virtual_jcts,
            "real_programs": [dataclasses.asdict(record) for record in self.records],
        }


@dataclass(frozen=True)
class RoundTrip:
    """The HTTP term at one load: per turn, the served programs' time beyond the engine-alone
    replay's, and beyond vLLM's own end-to-end latency."""

    jps: float
    http_avg_jct_s: float
    engine_avg_jct_s: float
    per_turn_s: float
    outside_e2e_s: float

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def trace_slice(programs: int, turns: int, token_scale: float, seed: int) -> list[TraceProgram]:
    return [
        dataclasses.replace(program, turns=program.turns[:turns])
        for program in load_named_trace(
            "swebench", programs=programs, seed=seed, token_scale=token_scale
        )
    ]


def profile_engine(model: Path, out: Path) -> Path:
    """``continuum-tiered profile --device cpu --engine`` of the model, to ``out``."""
    measure = ["--device", "cpu", "--quick", "--engine", "--max-tokens", "4096"]
    parser = argparse.ArgumentParser(prog="continuum-tiered")
    profiling_cli.add_profile_parser(parser.add_subparsers())
    args = parser.parse_args(["profile", "--model", str(model), *measure, "--out", str(out)])
    if profiling_cli.run_profile(args, []) != 0:
        raise RuntimeError("profiling failed")
    profile = TierProfile.load(out)
    if profile.engine is None or profile.engine.request_overhead_s:
        raise RuntimeError(f"{out}: expected engine steps without a request overhead term")
    return out


def probe_ratio(engine: LLMEngine, setup: InProcessSetup, steps: StepTimeModel) -> float:
    """How much longer the probe request takes on the idle engine now than the profile's
    steps say (median of three): above 1, the machine is slower than when profiled."""
    prompt, output = PROBE
    measured = statistics.median(
        timed_request(engine, setup.vocab_size, prompt, output) for _ in range(3)
    )
    predicted = steps.step_s([(0, prompt)], []) + sum(
        steps.step_s([], [prompt + k]) for k in range(output - 1)
    )
    return measured / predicted


def real_time(
    setup: InProcessSetup, programs: list[TraceProgram], seed: int, label: str, steps: StepTimeModel
) -> tuple[list[ProgramRecord], tuple[float, float], float]:
    """The programs on a fresh in-process engine; their records, the load average before
    and after the run, and the mean of the speed probes before and after it."""
    with served_engine(setup) as engine:
        before = os.getloadavg()[0], probe_ratio(engine, setup, steps)
        with tqdm(total=len(programs), unit="program", desc=f"real time, {label}") as bar:
            records = RealTimeReplay(engine, programs, setup.vocab_size, seed).run(
                lambda _: bar.update()
            )
        after = os.getloadavg()[0], probe_ratio(engine, setup, steps)
    tqdm.write(f"{label}: probe/profile {before[1]:.2f} before the run, {after[1]:.2f} after")
    return records, (before[0], after[0]), (before[1] + after[1]) / 2


def scaled_profile(profile: Path, factor: float, out: Path) -> Path:
    """A copy of the profile in ``out`` whose engine steps all take ``factor`` times as
    long."""
    loaded = TierProfile.load(profile)
    assert loaded.engine is not None  # checked by profile_engine
    engine = dataclasses.replace(
        loaded.engine,
        prefill_coeffs=tuple(factor * c for c in loaded.engine.prefill_coeffs),
        decode_coeffs=tuple(factor * c for c in loaded.engine.decode_coeffs),
    )
    path = out / f"{profile.stem}-x{factor:.3f}.json"
    dataclasses.replace(loaded, engine=engine).save(path)
    return path


def virtual_time(
    setup: InProcessSetup, programs: list[TraceProgram], profile: Path, seed: int, jps: float
) -> tuple[RunSummary, list[float]]:
    """The same programs in virtual time with the profile's engine steps alone."""
    deployment = Deployment(
        model=str(setup.model_dir),
        device="cpu",
        num_blocks=setup.kv_blocks,
        block_size=32,
        max_num_batched_tokens=setup.max_num_batched_tokens,
        max_num_seqs=setup.max_num_seqs,
    )
    with tqdm(total=len(programs), unit="program", desc="virtual time") as bar:
        summary, runs = replay(
            PEERS[setup.policy],
            programs,
            ReplaySetup(deployment, str(profile), seed),
            jps,
            bar.update,
        )
    by_id = {run.program.program_id: run.jct_s for run in runs}
    return summary, [by_id[p.program_id] for p in programs]


def one_load(
    name: str,
    jps: float,
    setup: InProcessSetup,
    trace: list[TraceProgram],
    profile: Path,
    seed: int,
    out: Path,
) -> LoadResult:
    programs = with_poisson_arrivals(trace, jps, seed)
    loaded = TierProfile.load(profile)
    steps = StepTimeModel.from_profile(
        loaded, json.loads((setup.model_dir / "config.json").read_text())
    )
    records, load, speed = real_time(setup, programs, seed, f"{name} load", steps)
    virtual, virtual_jcts = virtual_time(setup, programs, profile, seed, jps)
    scaled, _ = virtual_time(setup, programs, scaled_profile(profile, speed, out), seed, jps)
    real = summarize_records("engine, real time", jps, records)
    return LoadResult(name, jps, real, virtual, records, virtual_jcts, load, speed, scaled)


def served_round_trip(
    setup: InProcessSetup,
    profile: Path,
    programs: list[TraceProgram],
    engine: LoadResult,
    out: Path,
) -> RoundTrip:
    """The programs through ``continuum-tiered serve``, against the engine-alone replay of
    the same programs at the same load."""
    flags = ["--max-num-batched-tokens", str(setup.max_num_batched_tokens)]
    flags += [
        "--max-num-seqs",
        str(setup.max_num_seqs),
        "--policy",
        PEER,
        "--profile",
        str(profile),
    ]
    command = plugin_server_command(setup.model_dir, setup.kv_blocks, *flags)
    options = RunnerOptions(model="tiny", send_hints=True)
    warm_up = TraceProgram("warm-up", (programs[0].turns[0],))
    tqdm.write("HTTP: starting continuum-tiered serve ...")
    with ServerProcess(command, out / "server.log") as server:
        asyncio.run(run_programs(server.url, [warm_up], options))
        before = prometheus_samples(server.url, E2E)
        with tqdm(total=len(programs), unit="program", desc="real time, HTTP") as bar:
            records = asyncio.run(
                run_programs(server.url, programs, options, lambda _: bar.update())
            )
        after = prometheus_samples(server.url, E2E)
    turns = sum(len(r.turns) for r in records)
    failed = [r.error for r in records if r.error]
    served = after[f"{E2E}_count"] - before[f"{E2E}_count"]
    if failed or served != turns:
        raise RuntimeError(f"{turns} turns, {served} served by the engine; {failed}")
    http = summarize_records("HTTP", engine.jps, records)
    tools = sum(t.tool_duration_s for p in programs for t in p.turns[:-1])
    e2e_s = after[f"{E2E}_sum"] - before[f"{E2E}_sum"]
    return RoundTrip(
        jps=engine.jps,
        http_avg_jct_s=http.avg_jct_s,
        engine_avg_jct_s=engine.real.avg_jct_s,
        per_turn_s=(sum(r.jct_s for r in records) - sum(engine.real_jcts)) / turns,
        outside_e2e_s=(sum(r.jct_s for r in records) - tools - e2e_s) / turns,
    )


def print_table(results: Sequence[LoadResult], no_pins: LoadResult, trip: RoundTrip) -> None:
    print(
        f"\n{'load':<16}{'jps':>6}{'real avg':>10}{'virt avg':>10}{'error':>8}"
        f"{'real p95':>10}{'virt p95':>10}{'hit real':>9}{'hit virt':>9}  load avg"
        f"{'probe':>7}{'virt x probe':>13}{'error':>8}"
    )
    for r in [*results, no_pins]:
        print(
            f"{r.name:<16}{r.jps:>6g}{r.real.avg_jct_s:>10.2f}{r.virtual.avg_jct_s:>10.2f}"
            f"{r.error:>+8.1%}{r.real.p95_jct_s:>10.2f}{r.virtual.p95_jct_s:>10.2f}"
            f"{r.real.prefix_hit_ratio:>9.2f}{r.virtual.prefix_hit_ratio:>9.2f}"
            f"  {r.load_average[0]:.2f}-{r.load_average[1]:.2f}"
            f"{r.speed:>7.2f}{r.scaled.avg_jct_s:>13.2f}{r.scaled_error:>+8.1%}"
        )
    worst = max(results, key=lambda r: abs(r.error))  # the policy under test only
    verdict = "PASS" if abs(worst.error) <= TARGET else "FAIL"
    print(
        f"{verdict}: largest error {worst.error:+.1%} at the {worst.name} load "
        f"(target within {TARGET:.0%} at each)"
    )
    print(
        "probe: one request alone on the engine just before and after the real run, over "
        "the profile's time for it; 'virt x probe' replays with every step that much longer"
    )
    print(
        f"'{no_pins.name}': the connector with policy none (program FCFS, no pins), a "
        "diagnostic of what the pins change in each replay"
    )
    print(
        f"HTTP round trip at {trip.jps:g} programs/s: average JCT {trip.http_avg_jct_s:.2f} s "
        f"served, {trip.engine_avg_jct_s:.2f} s engine alone: {1e3 * trip.per_turn_s:+.0f} ms "
        f"per turn ({1e3 * trip.outside_e2e_s:.0f} ms per turn outside vLLM's e2e latency)"
    )


def plot(results: Sequence[LoadResult], trip: RoundTrip, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(results))
    width = 0.38
    real = [r.real.avg_jct_s for r in results]
    virtual = [r.virtual.avg_jct_s for r in results]
    ax.bar([x - width / 2 for x in xs], real, width, label="engine alone, real time")
    ax.bar([x + width / 2 for x in xs], virtual, width, label="virtual time (engine steps)")
    scaled = [r.scaled.avg_jct_s for r in results]
    ax.scatter([x + width / 2 for x in xs], scaled, marker="_", s=600, color="black", zorder=3)
    ax.annotate(" virtual, steps x probe", (len(results) - 1 + width / 2, scaled[-1]), fontsize=8)
    for x, r in zip(xs, results, strict=True):
        ax.annotate(f"{r.error:+.1%}", (x, max(r.real.avg_jct_s, r.virtual.avg_jct_s)), ha="center")
    ax.scatter([HTTP_LOAD - width / 2], [trip.http_avg_jct_s], color="black", marker="x", zorder=3)
    ax.annotate(" through HTTP", (HTTP_LOAD - width / 2, trip.http_avg_jct_s), fontsize=8)
    ax.set_xticks(list(xs), [f"{r.name}\n{r.jps:g} programs/s" for r in results])
    ax.set_ylabel("average job completion time (s)")
    ax.set_title("virtual-time replay vs vLLM's engine on this CPU")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_loads(text: str) -> list[float]:
    loads = [float(x) for x in text.split(",")]
    if len(loads) != len(LOAD_NAMES) or not all(x > 0 for x in loads):
        raise argparse.ArgumentTypeError(f"three positive arrival rates, got {text!r}")
    return loads


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, default=6)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--kv-blocks", type=int, default=256)
    p.add_argument(
        "--jps",
        type=parse_loads,
        default=[0.1, 0.3, 2.0],
        help="the light, medium and saturating arrival rates, programs per second",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=Path,
        help="the engine profile of an earlier run of this script (skips step 1)",
    )
    p.add_argument("--out", type=Path, default=Path("out/fidelity"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_llama(args.out / "model", DEMO_SHAPE)
    profile = args.profile or profile_engine(model, args.out / "cpu-profile.json")
    setup = InProcessSetup(model, args.kv_blocks, MAX_BATCHED_TOKENS, MAX_SEQS, PEER, str(profile))
    trace = trace_slice(args.programs, args.turns, args.token_scale, args.seed)
    results = [
        one_load(name, jps, setup, trace, profile, args.seed, args.out)
        for name, jps in zip(LOAD_NAMES, args.jps, strict=True)
    ]
    without_pins = dataclasses.replace(setup, policy=NO_PINS.pin_policy)
    name = f"{LOAD_NAMES[HTTP_LOAD]}, no pins"
    no_pins = one_load(name, args.jps[HTTP_LOAD], without_pins, trace, profile, args.seed, args.out)
    http_programs = with_poisson_arrivals(trace, args.jps[HTTP_LOAD], args.seed)
    trip = served_round_trip(setup, profile, http_programs, results[HTTP_LOAD], args.out)
    print(
        f"\n{args.programs} programs x {args.turns} turns (tokens x{args.token_scale:g}), KV pool "
        f"{args.kv_blocks} blocks, policy {PEER}, CPU build on {os.cpu_count()} CPUs; JCTs in s"
    )
    print_table(results, no_pins, trip)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "setup": vars(args),
                "target": TARGET,
                "loads": [r.to_json() for r in results],
                "no_pins": no_pins.to_json(),
                "http_round_trip": trip.to_json(),
            },
            indent=2,
            default=str,
        )
    )
    plot(results, trip, args.out / "fidelity.png")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'fidelity.png'}")
    return 0
