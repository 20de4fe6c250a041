"""``continuum-tiered demo``: vanilla vLLM against the plugin on the CPU build, side by side.

Both servers run the same random model with the same KV pool, small enough that the
programs compete for it, and replay the same SWE-bench programs (embedded slice, tokens
scaled down, real per-tool pauses). The plugin is the full system: the default policy with
LMCache's CPU and disk tiers below the pins (``--no-tiers``: without them). A third server,
vanilla vLLM with a pool large enough for every program's final context at once
(:func:`continuum_tiered.lab.experiment.bound_kv_blocks`), is the bound: what never losing a
prefix buys on this engine. Prints per-program turns, prefix-hit tokens and job completion
times, the average and p95 JCT ratios vLLM/ours and ours/bound, and writes ``results.json``
and ``jct.png`` to the output folder. With ``--repeats N`` the three run N times in turns
and the first run's tables are followed by every run's average-JCT ratios and their
medians.
The machinery is :mod:`continuum_tiered.lab.experiment`'s; ``experiments/`` has more systems.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from continuum_tiered.core.plots import pyplot
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.experiment import (
    BOUND,
    CONTINUUM_TIERED,
    CPU_KV_BLOCKS,
    CPU_TOKEN_SCALE,
    DEMO_SHAPE,
    VLLM,
    ServedModel,
    System,
    SystemRun,
    add_run_options,
    bound_kv_blocks,
    check_cpu_pool,
    plugin,
    run_experiment,
    vllm_bound,
)
from continuum_tiered.traces.arrivals import NAMES as TRACE_NAMES
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram

NAMES = (VLLM.name, CONTINUUM_TIERED.name, BOUND)  # the names every table and plot use
WITHOUT_TIERS = System(CONTINUUM_TIERED.name, plugin(), send_hints=True)
# Each ratio: (label, numerator system, denominator system); JCTs, so above 1 favours the
# denominator.
RATIOS = (
    ("vLLM/ours", VLLM.name, CONTINUUM_TIERED.name),
    ("ours/bound", CONTINUUM_TIERED.name, BOUND),
)
JCT_KEYS = ("avg_jct_s", "p95_jct_s")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="vanilla vLLM vs continuum-tiered on the CPU build")
    p.add_argument(
        "--trace",
        default="swebench",
        help=f"{', '.join(TRACE_NAMES)} or a trace path (default: the SWE-bench programs)",
    )
    p.add_argument("--programs", type=int, default=8)
    p.add_argument("--turns", type=int, default=8, help="first N turns of each program")
    p.add_argument(
        "--token-scale",
        type=float,
        default=CPU_TOKEN_SCALE,
        help="multiplies the trace's token counts (contexts of a few thousand tokens, whose "
        "prefill costs about as much as a tool call on two cores)",
    )
    p.add_argument(
        "--kv-blocks", type=int, default=CPU_KV_BLOCKS, help="KV pool, in 32-token blocks"
    )
    p.add_argument("--interarrival", type=float, default=0.5, help="mean seconds between programs")
    p.add_argument(
        "--tiers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LMCache's CPU and disk tiers below the pins, the full system (--no-tiers: pins "
        "and program FCFS only)",
    )
    add_run_options(p, repeats_help="runs of each server, in turns")
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.set_defaults(run=run_demo)


def demo_programs(args: argparse.Namespace) -> list[TraceProgram]:
    programs = [
        dataclasses.replace(program, turns=program.turns[: args.turns])
        for program in load_named_trace(args.trace, args.programs, args.seed, args.token_scale)
    ]
    return with_poisson_arrivals(programs, 1 / args.interarrival, args.seed)


def demo_systems(tiers: bool, bound_blocks: int) -> tuple[System, System, System]:
    """Vanilla vLLM and ours on the demo's pool, then vanilla vLLM on ``bound_blocks``."""
    return (VLLM, CONTINUUM_TIERED if tiers else WITHOUT_TIERS, vllm_bound(bound_blocks))


def jct_ratios(
    runs: Mapping[str, Any], ratios: Sequence[tuple[str, str, str]] = RATIOS
) -> dict[str, dict[str, float]]:
    """Each (label, top, bottom) of ``ratios`` for the average and p95 JCT of one round of
    runs (anything with a ``summary``), top's over bottom's."""
    return {
        label: {
            key: getattr(runs[top].summary, key) / getattr(runs[bottom].summary, key)
            for key in JCT_KEYS
        }
        for label, top, bottom in ratios
    }


def print_tables(runs: dict[str, SystemRun]) -> None:
    base, ours, bound = (runs[name] for name in NAMES)
    print(
        f"\n{'program':<28} {'turns':>5}  {'hit tok vLLM':>12} {'hit tok ours':>12} "
        f"{'hit tok bound':>13}  {'JCT vLLM s':>10} {'JCT ours s':>10} {'JCT bound s':>11}"
    )
    for b, o, u in zip(base.records, ours.records, bound.records, strict=True):
        print(
            f"{b.program_id:<28} {len(o.turns):>5}  {b.prefix_hit_tokens:>12} "
            f"{o.prefix_hit_tokens:>12} {u.prefix_hit_tokens:>13}  {b.jct_s:>10.2f} "
            f"{o.jct_s:>10.2f} {u.jct_s:>11.2f}"
        )
    ratios = jct_ratios(runs)
    labels = [label for label, _, _ in RATIOS]
    print(
        f"\n{'':<22} {'vLLM':>10} {'ours':>10} {'bound':>10}" + "".join(f" {x:>10}" for x in labels)
    )
    for key in JCT_KEYS:
        values = "".join(f" {getattr(run.summary, key):>10.2f}" for run in (base, ours, bound))
        print(f"{key:<22}{values}" + "".join(f" {ratios[x][key]:>10.2f}" for x in labels))
    hits = "".join(f" {run.summary.prefix_hit_ratio:>10.2f}" for run in (base, ours, bound))
    print(f"{'prefix_hit_ratio':<22}{hits}")
    for system, run in runs.items():
        if run.failed:
            print(f"WARNING: {run.failed} programs failed on {system}", file=sys.stderr)


def rounds(runs: Mapping[str, list[SystemRun]]) -> list[dict[str, SystemRun]]:
    """The runs round by round: every system's k-th run together."""
    return [
        dict(zip(runs, round_runs, strict=True)) for round_runs in zip(*runs.values(), strict=True)
    ]


def print_repeats(runs: dict[str, list[SystemRun]]) -> None:
    """Each round's average JCTs and their ratios, with the load average around every
    server's run."""
    labels = [label for label, _, _ in RATIOS]
    head = "".join(f" {f'avg {name} s':>22}" for name in NAMES)
    print(f"\n{'run':>3}{head}" + "".join(f" {x:>10}" for x in labels) + "  load")
    per_round = [(runs_k, jct_ratios(runs_k)) for runs_k in rounds(runs)]
    for k, (runs_k, ratios) in enumerate(per_round, 1):
        avgs = "".join(f" {runs_k[name].summary.avg_jct_s:>22.2f}" for name in NAMES)
        load = ", ".join(f"{runs_k[n].load[0]:.2f}-{runs_k[n].load[1]:.2f}" for n in NAMES)
        print(
            f"{k:>3}{avgs}"
            + "".join(f" {ratios[x]['avg_jct_s']:>10.2f}" for x in labels)
            + f"  {load}"
        )
    for label in labels:
        medians = statistics.median(ratios[label]["avg_jct_s"] for _, ratios in per_round)
        print(f"median average-JCT {label} over {len(per_round)} runs: {medians:.2f}")


def plot(runs: dict[str, SystemRun], path: Path) -> None:
    plt = pyplot()
    names = [r.program_id.split("__")[-1] for r in runs[NAMES[0]].records]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 4))
    width = 0.27
    for k, system in enumerate(NAMES):
        ax.bar(
            [x + (k - 1) * width for x in xs],
            [r.jct_s for r in runs[system].records],
            width,
            label=system,
        )
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("job completion time (s)")
    ratios = jct_ratios(runs)
    ax.set_title(
        "SWE-bench programs on the CPU build: vLLM, continuum-tiered and vLLM with every "
        "context's KV\n"
        + ", ".join(
            f"{label} avg {r['avg_jct_s']:.2f}, p95 {r['p95_jct_s']:.2f}"
            for label, r in ratios.items()
        ),
        fontsize=9,
    )
    ax.margins(y=0.15)  # room for the legend above the bars
    ax.legend(ncols=len(NAMES), loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_json(runs: dict[str, list[SystemRun]], kv_blocks: dict[str, int]) -> dict[str, Any]:
    """Every system's pool and runs, and each round's JCT ratios."""
    return {
        "kv_blocks": kv_blocks,
        "jct_ratios": [jct_ratios(runs_k) for runs_k in rounds(runs)],
        "runs": {name: [run.to_json() for run in rs] for name, rs in runs.items()},
    }


def run_demo(args: argparse.Namespace, _passthrough: list[str]) -> int:
    programs = demo_programs(args)
    if note := check_cpu_pool(args.kv_blocks, programs, DEMO_SHAPE):  # before any server
        print(note, flush=True)
    bound_blocks = bound_kv_blocks(programs)
    print(
        f"KV pool: {args.kv_blocks} blocks for vLLM and ours, {bound_blocks} for {BOUND} "
        "(every program's final context at once)",
        flush=True,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    engine = ServedModel.random_cpu(
        write_tiny_llama(args.out / "model", DEMO_SHAPE), args.kv_blocks
    )
    results = run_experiment(
        demo_systems(args.tiers, bound_blocks),
        programs,
        engine,
        args.out,
        jps=1 / args.interarrival,
        repeats=args.repeats,
        seed=args.seed,
        wait_s=args.wait_for_servers,
    )
    runs = {name: system_runs[0] for name, system_runs in results.runs.items()}
    print_tables(runs)
    if args.repeats > 1:
        print_repeats(results.runs)
    pools = {VLLM.name: args.kv_blocks, CONTINUUM_TIERED.name: args.kv_blocks, BOUND: bound_blocks}
    (args.out / "results.json").write_text(json.dumps(results_json(results.runs, pools), indent=2))
    plot(runs, args.out / "jct.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'jct.png'}")
    return 0
