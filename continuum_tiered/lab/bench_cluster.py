"""Two replicas behind vLLM's router: ``round_robin`` against ``consistent_hash`` against
``consistent_hash`` with the shared Redis tier, on the main job's programs.

Each setup is a fresh ``continuum-tiered cluster`` (Redis when it has the shared tier, two
replicas of the demo's random Llama with the demo's KV pool, LMCache tiers and profile,
and vllm-router), started after the previous one stopped, and replays the same SWE-bench
programs with the same arrivals and seed (:func:`continuum_tiered.lab.demo.demo_programs`),
every program sending its id in ``X-Session-ID``. The report gives each setup's JCTs and
prefix hits, where each replica's prefixes came from (the connector's counters), how the
requests spread, and the JCT ratios between setups, all from one run. It also measures
what a change of the router's hash ring moves (:mod:`continuum_tiered.lab.ring_change`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from continuum_tiered.cluster.launch import Cluster, ClusterConfig
from continuum_tiered.cluster.replicas import ReplicaConfig
from continuum_tiered.core.metrics import RunSummary
from continuum_tiered.core.server_process import prometheus_samples, tiny_engine_flags
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.demo import demo_programs, jct_ratios
from continuum_tiered.lab.experiment import (
    CPU_KV_BLOCKS,
    CPU_PROFILE,
    CPU_TIERS,
    CPU_TOKEN_SCALE,
    DEMO_SHAPE,
    check_cpu_pool,
    connector_counters,
    wait_for_quiet_machine,
)
from continuum_tiered.lab.ring_change import measure_ring_changes, ring_table
from continuum_tiered.replay.runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.traces.model import TraceProgram

REPLICAS = 2
REQUESTS = "vllm:request_success_total"


@dataclass(frozen=True)
class Setup:
    name: str
    router_policy: str
    shared_tier: bool


SETUPS = (
    Setup("round_robin", "round_robin", shared_tier=False),
    Setup("consistent_hash", "consistent_hash", shared_tier=False),
    Setup("consistent_hash+shared", "consistent_hash", shared_tier=True),
)
# (label, numerator, denominator) of JCT ratios: above 1 favours the denominator.
RATIOS = (
    ("round_robin / consistent_hash", "round_robin", "consistent_hash"),
    ("round_robin / consistent_hash+shared", "round_robin", "consistent_hash+shared"),
    ("consistent_hash / consistent_hash+shared", "consistent_hash", "consistent_hash+shared"),
)


@dataclass
class SetupRun:
    setup: str
    summary: RunSummary
    records: list[ProgramRecord]
    replica_counters: list[dict[str, float]]  # per replica: requests and prefix sources
    load: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary.to_json(),
            "failed_programs": sum(r.error is not None for r in self.records),
            "replica_counters": self.replica_counters,
            "load_average_1m": {"start": self.load[0], "end": self.load[1]},
            "programs": [
                {"program_id": r.program_id, "jct_s": r.jct_s, "error": r.error}
                for r in self.records
            ],
        }


def replica_counters(url: str) -> dict[str, float]:
    return {
        "requests": prometheus_samples(url, REQUESTS).get(REQUESTS, 0.0),
        **connector_counters(url),
    }


def run_setup(
    setup: Setup,
    programs: Sequence[TraceProgram],
    model_dir: Path,
    kv_blocks: int,
    out: Path,
    seed: int,
    jps: float,
    bar: tqdm,
) -> SetupRun:
    scratch = out / "tiers" / setup.name
    replica = ReplicaConfig(
        str(model_dir),
        ("--profile", CPU_PROFILE, *tiny_engine_flags(model_dir, kv_blocks)),
        local_tiers=CPU_TIERS.spec(scratch),
    )
    config = ClusterConfig(
        REPLICAS, replica, shared_tier=setup.shared_tier, router_policy=setup.router_policy
    )
    options = RunnerOptions(model="tiny", send_hints=True, seed=seed)
    try:
        with Cluster(config, out / setup.name, progress=tqdm.write) as cluster:
            load_start = os.getloadavg()[0]
            records = asyncio.run(
                run_programs(cluster.url, programs, options, lambda _: bar.update())
            )
            load_end = os.getloadavg()[0]
            counters = [replica_counters(r.url) for r in cluster.replicas]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize_records(setup.name, jps, records)
    tqdm.write(
        f"[{setup.name}] average JCT {summary.avg_jct_s:.2f} s, p95 {summary.p95_jct_s:.2f} s, "
        f"prefix hits {summary.prefix_hit_ratio:.2f}, requests per replica "
        f"{[int(c['requests']) for c in counters]}"
    )
    return SetupRun(setup.name, summary, records, counters, (load_start, load_end))


PREFIX_SOURCES = ("gpu", "cpu", "disk", "remote", "recompute")


def report_lines(runs: dict[str, SetupRun], ring: list[dict[str, Any]], command: str) -> list[str]:
    lines = [
        "# Two replicas behind vllm-router: routing and the shared tier",
        "",
        f"Command: `{command}`",
        "",
        "| setup | avg JCT s | p95 JCT s | prefix-hit ratio | failed | requests per replica "
        "| load 1m |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, run in runs.items():
        s = run.summary
        spread = " / ".join(str(int(c["requests"])) for c in run.replica_counters)
        lines.append(
            f"| {name} | {s.avg_jct_s:.2f} | {s.p95_jct_s:.2f} | {s.prefix_hit_ratio:.2f} | "
            f"{run.to_json()['failed_programs']} | {spread} | {run.load[0]:.1f}-{run.load[1]:.1f} |"
        )
    lines += [
        "",
        "Prompt tokens by where their prefix came from, both replicas together (the "
        "connector's `vllm:continuum_prefix_tokens_from_*_total`):",
        "",
        "| setup | " + " | ".join(PREFIX_SOURCES) + " |",
        "|---|" + "---:|" * len(PREFIX_SOURCES),
    ]
    for name, run in runs.items():
        totals = [
            sum(c.get(f"prefix_tokens_from_{s}", 0.0) for c in run.replica_counters)
            for s in PREFIX_SOURCES
        ]
        lines.append(f"| {name} | " + " | ".join(f"{t:.0f}" for t in totals) + " |")
    lines += ["", "JCT ratios (one run, same programs and seed; above 1 favours the second):", ""]
    lines += ["| ratio | average | p95 |", "|---|---:|---:|"]
    for label, ratio in jct_ratios(runs, RATIOS).items():
        lines.append(f"| {label} | {ratio['avg_jct_s']:.2f} | {ratio['p95_jct_s']:.2f} |")
    lines += [
        "",
        "What a change of the router's hash ring moves (real vllm-router, programs' ids in "
        "X-Session-ID, workers that answer with their URL; "
        "`continuum_tiered.lab.ring_change`):",
        "",
        *ring_table(ring),
    ]
    return lines


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/bench_cluster.py",
        description="2 replicas behind vllm-router: round_robin vs consistent_hash vs "
        "consistent_hash with the shared Redis tier, on the main job's programs",
    )
    p.add_argument("--programs", type=int, default=16)
    p.add_argument("--turns", type=int, default=8, help="first N turns of each program")
    p.add_argument("--token-scale", type=float, default=CPU_TOKEN_SCALE)
    p.add_argument("--kv-blocks", type=int, default=CPU_KV_BLOCKS, help="KV pool of each replica")
    p.add_argument(
        "--interarrival",
        type=float,
        default=0.25,
        help="mean seconds between programs (the demo's 0.5 over two replicas)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ring-programs", type=int, default=500)
    p.add_argument(
        "--wait-for-servers",
        type=float,
        default=600.0,
        metavar="S",
        help="first wait up to S seconds for other vLLM servers on the machine to stop",
    )
    p.add_argument("--out", type=Path, default=Path("docs/results/cluster-bench"))
    return p


def run_bench(args: argparse.Namespace, command: str) -> dict[str, Any]:
    programs = demo_programs(args)
    if note := check_cpu_pool(args.kv_blocks, programs, DEMO_SHAPE):
        tqdm.write(note)
    work = Path(tempfile.mkdtemp(prefix="cluster-bench-"))  # kept, with the logs, on a failure
    tqdm.write(f"model, tiers and logs in {work}")
    model_dir = write_tiny_llama(work / "model", DEMO_SHAPE)
    wait_for_quiet_machine(args.wait_for_servers)
    runs: dict[str, SetupRun] = {}
    with tqdm(total=len(SETUPS) * len(programs), unit="program", desc="cluster bench") as bar:
        for setup in SETUPS:
            bar.set_postfix_str(setup.name)
            runs[setup.name] = run_setup(
                setup, programs, model_dir, args.kv_blocks, work, args.seed,
                1 / args.interarrival, bar,
            )  # fmt: skip
    tqdm.write("measuring hash-ring changes ...")
    ring = measure_ring_changes((2, 3, 4, 8), args.ring_programs, work / "ring")
    results = {
        "command": command,
        "replicas": REPLICAS,
        "programs": len(programs),
        "kv_blocks": args.kv_blocks,
        "jct_ratios": jct_ratios(runs, RATIOS),
        "setups": {name: run.to_json() for name, run in runs.items()},
        "ring_changes": ring,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "report.md").write_text("\n".join(report_lines(runs, ring, command)) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = bench_parser().parse_args(argv)
    command = shlex.join(["python", "experiments/bench_cluster.py", *argv])
    run_bench(args, command)
    print((args.out / "report.md").read_text())
    return 0
