"""Routing a cluster of agent-serving replicas, in virtual time (issue 16).

N replicas (default 8) of the ``swebench-8b`` setting (continuum_tiered/sim/settings.py:
Llama-3.1-8B on an H100, the built-in profile) at N times the single replica's saturating
load, each system behind each router (:mod:`continuum_tiered.sim.routing`), every run on
the same programs, arrivals and seed. Systems with LMCache share a remote tier below
their disks (the profile's ``remote`` tier, else
``continuum_tiered.sim.shared_tier.DEFAULT_SHARED_TIER``). With ``--fail-routings``,
those routers also run with replica 0 lost at ``--fail-at`` (default: when the last
program arrives, every program then in flight). A single replica at the saturating load,
with 1/N of the programs, is the reference.

A run costs about replicas x (arrival span + the longest program's JCT) / step time in
scheduler steps, whatever the number of programs: the longest SWE-bench programs decode
for minutes of virtual time on every replica. The report and the JSON are rewritten
after every run, so an interrupted grid leaves what it finished.

    python experiments/cluster_grid.py [--replicas 8] [--programs 800]
        [--systems vllm,vllm+lmcache,tiered] [--routings program-affine,...]
        [--fail-routings program-affine] [--fail-at SECONDS] [--seed 0] [--out out/cluster]

Writes report.md, results.json and cluster.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from continuum_tiered.core.plots import pyplot
from continuum_tiered.sim.cluster import ClusterRun, cluster_table, replay_cluster
from continuum_tiered.sim.peers import get_peer
from continuum_tiered.sim.routing import ROUTERS, ClusterSpec
from continuum_tiered.sim.settings import HARDWARE, SETTINGS
from continuum_tiered.sim.shared_tier import DEFAULT_SHARED_TIER_BYTES, shared_tier_of
from continuum_tiered.sim.simulate import ReplaySetup
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals

SETTING = SETTINGS["swebench-8b"]
SYSTEMS = ("vllm", "vllm+lmcache", "tiered")
ROUTINGS = ("program-affine", "round-robin", "cache-aware", "least-loaded")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--programs", type=int, help="in all (default: the setting's per replica)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--routings", default=",".join(ROUTINGS), help=f"from {', '.join(ROUTERS)}")
    p.add_argument("--fail-routings", default="program-affine", help="'' for none")
    p.add_argument("--fail-at", type=float, help="seconds (default: the last arrival)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/cluster"))
    args = p.parse_args(argv)
    n = args.replicas
    programs_total = args.programs or SETTING.programs * n
    jps = SETTING.loads[1] * n
    systems = [get_peer(s.strip()) for s in args.systems.split(",")]
    setup = ReplaySetup(HARDWARE["h100-base"].deployment(SETTING), SETTING.profile, args.seed)
    programs = load_named_trace(SETTING.trace, programs=programs_total, seed=args.seed)
    timed = with_poisson_arrivals(programs, jps, args.seed)
    fail_at = args.fail_at if args.fail_at is not None else timed[-1].arrival_s
    single = with_poisson_arrivals(programs[: max(1, programs_total // n)], jps / n, args.seed)
    # One router at a time for every system, each lost-replica run right after its
    # router's whole runs; the single-replica reference last.
    failing = {r.strip() for r in args.fail_routings.split(",") if r.strip()}
    cases = [(r.strip(), fail) for r in args.routings.split(",") for fail in (None, fail_at)]
    plan = [
        (peer, ClusterSpec(n, routing, fail), timed, jps)
        for routing, fail in cases
        if fail is None or routing in failing
        for peer in systems
    ]
    plan += [(peer, ClusterSpec(1, "round-robin"), single, jps / n) for peer in systems]

    args.out.mkdir(parents=True, exist_ok=True)
    shared = shared_tier_of(setup.profile())
    config = {
        "setting": SETTING.name,
        "profile": SETTING.profile,
        "replicas": n,
        "programs": programs_total,
        "full_scale_programs": SETTING.programs * n,
        "jps": jps,
        "fail_at_s": fail_at,
        "seed": args.seed,
        "shared_tier": {**shared.to_json(), "capacity_bytes": DEFAULT_SHARED_TIER_BYTES},
        "runs_planned": len(plan),
        "wall_s": 0.0,
    }
    runs: list[ClusterRun] = []
    start = time.perf_counter()
    total = sum(len(progs) for _, _, progs, _ in plan)
    with tqdm(total=total, unit="program", desc="cluster grid", mininterval=10) as bar:
        for peer, spec, progs, rate in plan:
            bar.set_postfix_str(f"{peer.name} x{spec.replicas} {spec.routing} {spec.fail_at_s}")
            runs.append(replay_cluster(peer, progs, setup, rate, spec, bar.update)[0])
            config["wall_s"] = time.perf_counter() - start
            _write(args.out, config, runs)
    print(report(config, runs))
    return 0


def _write(out: Path, config: dict, runs: list[ClusterRun]) -> None:
    results = {"config": config, "runs": [r.to_json() for r in runs]}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(report(config, runs))
    plot(results["runs"], config["replicas"], out / "cluster.png")


def report(config: dict, runs: list[ClusterRun]) -> str:
    n = config["replicas"]
    whole = [r for r in runs if r.spec.fail_at_s is None]
    lost = {(r.summary.policy, r.spec.routing): r for r in runs if r.spec.fail_at_s is not None}
    whole_n = [r for r in whole if r.spec.replicas == n]
    cost = [
        "| system | routing | avg JCT s | +avg | p95 s | +p95 | programs/h | throughput "
        "| retried turns | moved turns |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in whole_n:
        if (f := lost.get((r.summary.policy, r.spec.routing))) is None:
            continue
        a, b = r.summary, f.summary
        cost.append(
            f"| {a.policy} | {r.spec.routing} | {b.avg_jct_s:.1f} | "
            f"{b.avg_jct_s / a.avg_jct_s - 1:+.1%} | {b.p95_jct_s:.1f} | "
            f"{b.p95_jct_s / a.p95_jct_s - 1:+.1%} | {b.throughput_programs_per_h:.0f} | "
            f"{b.throughput_programs_per_h / a.throughput_programs_per_h - 1:+.1%} | "
            f"{f.retried_turns} | {f.moved_turns} |"
        )
    shared = config["shared_tier"]
    scale = config["programs"] / config["full_scale_programs"]
    return (
        "\n\n".join(
            [
                f"# {n} replicas of {config['setting']} behind a router, in virtual time",
                f"{config['programs']} SWE-bench programs ({scale:.0%} of the setting's "
                f"{config['full_scale_programs'] // n} per replica) arriving at "
                f"{config['jps']:g} programs/s ({n}x one replica's saturating load), profile "
                f"`{config['profile']}`, seed {config['seed']}. Shared tier for the systems with "
                f"LMCache: {shared['bandwidth_bytes_per_s'] / 1e9:g} GB/s, "
                f"{shared['latency_s'] * 1e3:g} ms per transfer, "
                f"{shared['capacity_bytes'] / 1e12:g} TB. The `x1` rows: one replica at the "
                f"saturating load with 1/{n} of the programs. {len(runs)} of "
                f"{config['runs_planned']} runs, wall time {config['wall_s'] / 60:.1f} min.",
                "## Each router, whole cluster",
                cluster_table(whole),
                f"## Losing replica 0 at {config['fail_at_s']:.0f} s",
                "Figures with the loss, and the change against the same system and router "
                "without it.",
                "\n".join(cost),
            ]
        )
        + "\n"
    )


def plot(rows: list[dict], replicas: int, path: Path) -> None:
    """Average and p95 JCT by router and system (hatched: a replica lost), from the rows of
    ``results.json``. The axes start near the lowest bar: the routers differ by percents."""
    plt = pyplot()
    rows = [r for r in rows if r["replicas"] == replicas]
    if not rows:
        return
    systems = list(dict.fromkeys(r["policy"] for r in rows))
    routings = list(dict.fromkeys(r["routing"] for r in rows))
    by_key = {(r["policy"], r["routing"], r["fail_at_s"] is not None): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / (2 * len(systems))
    for ax, (metric, title) in zip(
        axes, (("avg_jct_s", "average JCT (s)"), ("p95_jct_s", "p95 JCT (s)")), strict=True
    ):
        for i, system in enumerate(systems):
            for lost in (False, True):
                row = [by_key.get((system, routing, lost)) for routing in routings]
                offset = (2 * i + lost - len(systems) + 0.5) * width
                ax.bar(
                    [k + offset for k in range(len(routings))],
                    [math.nan if r is None else r[metric] for r in row],
                    width,
                    color=f"C{i}",
                    hatch="//" if lost else None,
                    alpha=0.6 if lost else 1.0,
                    label=f"{system}{', replica 0 lost' if lost else ''}",
                )
        lowest = min(r[metric] for r in rows)
        ax.set_ylim(bottom=0.9 * lowest)
        ax.set_xticks(range(len(routings)), routings)
        ax.set_ylabel(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(systems) * 2, fontsize=8)
    fig.suptitle(f"{replicas} replicas, Llama-3.1-8B on H100 (virtual time)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
