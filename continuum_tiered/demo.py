"""``continuum-tiered demo``: vanilla vLLM against the plugin on the CPU build, side by side.

Both servers run the same random model with the same KV pool, small enough that the
programs compete for it, and replay the same SWE-bench programs (embedded slice, tokens
scaled down, real per-tool pauses). The plugin is the full system: the default policy with
LMCache's CPU and disk tiers below the pins (``--no-tiers``: without them). Prints
per-program turns, prefix-hit tokens and job completion times, and writes ``results.json``
and ``jct.png`` to the output folder. With ``--repeats N`` both run N times in turns and
the first run's tables are followed by every run's average-JCT ratio and their median.
The machinery is :mod:`continuum_tiered.experiment`'s; ``experiments/`` has more systems.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from continuum_tiered.experiment import (
    CONTINUUM_TIERED,
    CPU_KV_BLOCKS,
    CPU_TOKEN_SCALE,
    DEMO_SHAPE,
    VLLM,
    Engine,
    System,
    SystemRun,
    add_run_options,
    check_cpu_pool,
    plugin,
    run_experiment,
)
from continuum_tiered.plots import pyplot
from continuum_tiered.tiny_model import write_tiny_llama
from continuum_tiered.traces.arrivals import with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.traces.swebench import SwebenchOptions, load_swebench

SYSTEMS = (VLLM, CONTINUUM_TIERED)  # the names every table and plot use
WITHOUT_TIERS = System(CONTINUUM_TIERED.name, plugin(), send_hints=True)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="vanilla vLLM vs continuum-tiered on the CPU build")
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
    options = SwebenchOptions(token_scale=args.token_scale, max_turns=args.turns, seed=args.seed)
    programs = load_swebench(options=options, limit=args.programs)
    return with_poisson_arrivals(programs, 1 / args.interarrival, args.seed)


def print_tables(runs: dict[str, SystemRun]) -> None:
    base, ours = (runs[s.name] for s in SYSTEMS)
    print(
        f"\n{'program':<28} {'turns':>5}  {'hit tok vLLM':>12} {'hit tok ours':>12}"
        f"  {'JCT vLLM s':>10} {'JCT ours s':>10}"
    )
    for b, o in zip(base.records, ours.records, strict=True):
        print(
            f"{b.program_id:<28} {len(o.turns):>5}  {b.prefix_hit_tokens:>12} "
            f"{o.prefix_hit_tokens:>12}  {b.jct_s:>10.2f} {o.jct_s:>10.2f}"
        )
    sb, so = base.summary, ours.summary
    print(f"\n{'':<22} {'vLLM':>10} {'ours':>10} {'vLLM/ours':>10}")
    for key in ("avg_jct_s", "p95_jct_s"):
        b, o = getattr(sb, key), getattr(so, key)
        print(f"{key:<22} {b:>10.2f} {o:>10.2f} {b / o:>10.2f}")
    print(f"{'prefix_hit_ratio':<22} {sb.prefix_hit_ratio:>10.2f} {so.prefix_hit_ratio:>10.2f}")
    for system, run in runs.items():
        if run.failed:
            print(f"WARNING: {run.failed} programs failed on {system}", file=sys.stderr)


def avg_jct_ratios(runs: dict[str, list[SystemRun]]) -> list[float]:
    """vLLM's average JCT over ours, run by run."""
    base, ours = (runs[s.name] for s in SYSTEMS)
    return [b.summary.avg_jct_s / o.summary.avg_jct_s for b, o in zip(base, ours, strict=True)]


def print_repeats(runs: dict[str, list[SystemRun]]) -> None:
    """Each run's average-JCT ratio with the load average around both servers' runs."""
    ratios = avg_jct_ratios(runs)
    base, ours = (runs[s.name] for s in SYSTEMS)
    print(f"\n{'run':>3} {'avg JCT vLLM s':>14} {'avg JCT ours s':>14} {'vLLM/ours':>9}  load")
    for k, (b, o, ratio) in enumerate(zip(base, ours, ratios, strict=True), 1):
        load = f"{b.load[0]:.2f}-{b.load[1]:.2f}, {o.load[0]:.2f}-{o.load[1]:.2f}"
        print(
            f"{k:>3} {b.summary.avg_jct_s:>14.2f} {o.summary.avg_jct_s:>14.2f} {ratio:>9.2f}  "
            f"{load}"
        )
    print(f"median vLLM/ours over {len(ratios)} runs: {statistics.median(ratios):.2f}")


def plot(runs: dict[str, SystemRun], path: Path) -> None:
    plt = pyplot()
    names = [r.program_id.split("__")[-1] for r in runs[SYSTEMS[0].name].records]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    width = 0.4
    for k, system in enumerate(SYSTEMS):
        ax.bar(
            [x + (k - 0.5) * width for x in xs],
            [r.jct_s for r in runs[system.name].records],
            width,
            label=system.name,
        )
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("job completion time (s)")
    ax.set_title("SWE-bench programs on the CPU build: vLLM vs continuum-tiered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace, _passthrough: list[str]) -> int:
    programs = demo_programs(args)
    if note := check_cpu_pool(args.kv_blocks, programs, DEMO_SHAPE):  # before any server
        print(note, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = Engine.random_cpu(write_tiny_llama(args.out / "model", DEMO_SHAPE), args.kv_blocks)
    jps = 1 / args.interarrival
    results = run_experiment(
        (VLLM, CONTINUUM_TIERED if args.tiers else WITHOUT_TIERS),
        programs,
        engine,
        args.out,
        jps=jps,
        repeats=args.repeats,
        seed=args.seed,
        wait_s=args.wait_for_servers,
    )
    runs = {name: system_runs[0] for name, system_runs in results.runs.items()}
    print_tables(runs)
    if args.repeats > 1:
        print_repeats(results.runs)
    (args.out / "results.json").write_text(
        json.dumps(
            {name: [run.to_json() for run in rs] for name, rs in results.runs.items()}, indent=2
        )
    )
    plot(runs, args.out / "jct.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'jct.png'}")
    return 0
