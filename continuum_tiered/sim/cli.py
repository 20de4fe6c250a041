"""``continuum-tiered simulate``: every policy at every load, in virtual time, on one
replica or on a cluster of them behind a router (``--replicas``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from continuum_tiered.core.deployment import MODEL_SHAPES, Deployment
from continuum_tiered.core.metrics import RunSummary, markdown_table
from continuum_tiered.core.plots import plot_jct_cdf, pyplot
from continuum_tiered.sim.peers import PEERS, get_peer
from continuum_tiered.sim.routing import ROUTERS, ClusterSpec
from continuum_tiered.traces.arrivals import NAMES, load_named_trace, with_poisson_arrivals

if TYPE_CHECKING:
    from continuum_tiered.sim.peers import Peer
    from continuum_tiered.sim.simulate import ReplaySetup
    from continuum_tiered.traces.model import TraceProgram


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.05,0.1, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"loads must be > 0, got {text!r}")
    return values


def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="virtual-time replay of agent traces on vLLM's real scheduler"
    )
    p.add_argument(
        "--trace",
        default="swebench",
        help=f"{', '.join(NAMES)} or a trace path",
    )
    p.add_argument("--policies", default=",".join(PEERS), help=f"from {', '.join(PEERS)}")
    p.add_argument("--jps", type=_floats, default=[0.05, 0.1, 0.2], help="program arrivals/s")
    p.add_argument("--programs", type=int, default=100)
    p.add_argument("--model", default="llama-3.1-8b", choices=sorted(MODEL_SHAPES))
    p.add_argument(
        "--profile",
        help="tier profile name or path (default: the built-in h100-MODEL); 'roofline' "
        "estimates one from the model shape",
    )
    p.add_argument(
        "--async-scheduling",
        action="store_true",
        help="vLLM's AsyncScheduler, as the CUDA build runs by default: outputs are seen one "
        "step later and a finished request's blocks come back one step later",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/simulate"))
    cluster = p.add_argument_group(
        "cluster", "N replicas behind a router on one virtual clock; --jps is the cluster's"
    )
    cluster.add_argument("--replicas", type=int, default=1)
    cluster.add_argument("--routing", default="program-affine", help=f"from {', '.join(ROUTERS)}")
    cluster.add_argument(
        "--fail-replica-at",
        type=float,
        metavar="SECONDS",
        help="lose replica 0 at this virtual time: its turns start over elsewhere",
    )
    cluster.add_argument(
        "--no-shared-tier",
        action="store_true",
        help="no remote tier shared by the replicas' LMCache (a moved program recomputes)",
    )
    p.set_defaults(run=run_simulate)


def run_simulate(args: argparse.Namespace, _passthrough: list[str]) -> int:
    spec = ClusterSpec(args.replicas, args.routing, args.fail_replica_at, not args.no_shared_tier)
    if spec.replicas > 1 or spec.fail_at_s is not None:
        return run_cluster(args, spec)
    from continuum_tiered.sim.simulate import replay  # imports vLLM: only when run

    peers, programs, setup = _inputs(args)

    results: list[RunSummary] = []
    jcts: dict[tuple[str, float], list[float]] = {}
    total = len(peers) * len(args.jps) * len(programs)
    with tqdm(total=total, unit="program", desc="simulate") as bar:
        for jps in args.jps:
            timed = with_poisson_arrivals(programs, jps, args.seed)
            for peer in peers:
                bar.set_postfix_str(f"{peer.name} @ {jps} jps")
                summary, runs = replay(peer, timed, setup, jps, on_program_done=bar.update)
                results.append(summary)
                jcts[(peer.name, jps)] = [r.jct_s for r in runs]
    _write(args, [r.to_json() for r in results], markdown_table(results), results, jcts)
    return 0


def run_cluster(args: argparse.Namespace, spec: ClusterSpec) -> int:
    from continuum_tiered.sim.cluster import cluster_table, replay_cluster  # imports vLLM

    peers, programs, setup = _inputs(args)
    runs = []
    jcts: dict[tuple[str, float], list[float]] = {}
    total = len(peers) * len(args.jps) * len(programs)
    with tqdm(total=total, unit="program", desc=f"simulate x{spec.replicas}") as bar:
        for jps in args.jps:
            timed = with_poisson_arrivals(programs, jps, args.seed)
            for peer in peers:
                bar.set_postfix_str(f"{peer.name} @ {jps} jps")
                run, program_runs, _ = replay_cluster(
                    peer, timed, setup, jps, spec, on_program_done=bar.update
                )
                runs.append(run)
                jcts[(peer.name, jps)] = [r.jct_s for r in program_runs]
    results = [run.summary for run in runs]
    _write(args, [run.to_json() for run in runs], cluster_table(runs), results, jcts)
    return 0


def _inputs(args: argparse.Namespace) -> tuple[list[Peer], list[TraceProgram], ReplaySetup]:
    """The peers, the trace's programs and the setup; every input checked before a run."""
    from continuum_tiered.sim.simulate import ReplaySetup  # imports vLLM: only when run

    args.profile = args.profile or f"h100-{args.model}"
    peers = [get_peer(name.strip()) for name in args.policies.split(",")]
    programs = load_named_trace(args.trace, programs=args.programs, seed=args.seed)
    setup = ReplaySetup(
        Deployment(model=args.model, async_scheduling=args.async_scheduling),
        None if args.profile == "roofline" else args.profile,
        seed=args.seed,
    )
    setup.profile()  # a profile of another model fails here, before any run
    return peers, programs, setup


def _write(
    args: argparse.Namespace,
    runs: list[dict],
    table: str,
    results: list[RunSummary],
    jcts: dict[tuple[str, float], list[float]],
) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "trace": str(args.trace),
        "profile": args.profile,
        "model": args.model,
        "seed": args.seed,
        "runs": runs,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "summary.md").write_text(table + "\n")
    plot_results(results, jcts, args.out)
    print(table)
    print(f"\nwrote {args.out}/summary.json, summary.md, jct_vs_load.png, jct_cdf.png")


def plot_results(
    results: list[RunSummary], jcts: dict[tuple[str, float], list[float]], out: Path
) -> None:
    plt = pyplot()
    policies = list(dict.fromkeys(r.policy for r in results))
    loads = sorted({r.jps for r in results})
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in policies:
        points = sorted((r.jps, r.avg_jct_s) for r in results if r.policy == policy)
        ax.plot(*zip(*points, strict=True), marker="o", label=policy)
    ax.set_xlabel("load (programs per second)")
    ax.set_ylabel("average job completion time (s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "jct_vs_load.png", dpi=120)
    plt.close(fig)

    panels = {
        f"{jps:g} programs/s": {policy: jcts[(policy, jps)] for policy in policies} for jps in loads
    }
    plot_jct_cdf(panels, out / "jct_cdf.png")
