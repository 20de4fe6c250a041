"""``continuum-tiered demo``: vanilla vLLM against the plugin on the CPU build, side by side.

Both servers run the same random model with the same KV pool, small enough that the
programs compete for it, and replay the same SWE-bench programs (embedded slice, tokens
scaled down, real per-tool pauses). Prints per-program turns, prefix-hit tokens and job
completion times, and writes ``results.json`` and ``jct.png`` to the output folder.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
from pathlib import Path

from continuum_tiered.agent_runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.metrics import RunSummary
from continuum_tiered.server import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
    vanilla_server_command,
)
from continuum_tiered.tiny_model import TinyLlamaShape, write_tiny_llama
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.traces.swebench import SwebenchOptions, load_swebench

# Big enough that prefilling a few hundred tokens takes real time on two cores (so a lost
# prefix costs something), small enough to start in seconds.
DEMO_SHAPE = TinyLlamaShape(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
)
SYSTEMS = ("vllm", "continuum-tiered")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="vanilla vLLM vs continuum-tiered on the CPU build")
    p.add_argument("--programs", type=int, default=8)
    p.add_argument("--turns", type=int, default=8, help="first N turns of each program")
    p.add_argument(
        "--token-scale",
        type=float,
        default=0.25,
        help="multiplies the trace's token counts (contexts of a few thousand tokens, whose "
        "prefill costs about as much as a tool call on two cores)",
    )
    p.add_argument("--kv-blocks", type=int, default=256, help="KV pool, in 32-token blocks")
    p.add_argument("--interarrival", type=float, default=0.5, help="mean seconds between programs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    p.set_defaults(run=run_demo)


def demo_programs(args: argparse.Namespace) -> list[TraceProgram]:
    options = SwebenchOptions(token_scale=args.token_scale, max_turns=args.turns, seed=args.seed)
    programs = load_swebench(options=options, limit=args.programs)
    rng = random.Random(args.seed)
    arrival, timed = 0.0, []
    for program in programs:
        timed.append(dataclasses.replace(program, arrival_s=arrival))
        arrival += rng.expovariate(1 / args.interarrival)
    return timed


def server_command(system: str, model_dir: Path, kv_blocks: int) -> list[str]:
    if system == "vllm":
        return vanilla_server_command(model_dir, kv_blocks, "--enable-prompt-tokens-details")
    return plugin_server_command(model_dir, kv_blocks)


def run_system(
    system: str, model_dir: Path, programs: list[TraceProgram], args: argparse.Namespace
) -> list[ProgramRecord]:
    print(f"[{system}] starting server ...", flush=True)
    command = server_command(system, model_dir, args.kv_blocks)
    with ServerProcess(command, args.out / f"{system}.log") as server:
        print(f"[{system}] replaying {len(programs)} programs ...", flush=True)
        options = RunnerOptions(model="tiny", send_hints=system != "vllm", seed=args.seed)
        records = asyncio.run(run_programs(server.url, programs, options))
        if system != "vllm":
            print_connector_counters(server.url)
        return records


def print_connector_counters(url: str) -> None:
    """The plugin's own counters, from its Prometheus endpoint."""
    counters = {
        name.removeprefix("vllm:continuum_").removesuffix("_total"): value
        for name, value in prometheus_samples(url, "vllm:continuum_").items()
        if name.endswith("_total")
    }
    print(f"[continuum-tiered] {', '.join(f'{k}={v:g}' for k, v in counters.items())}")


def print_tables(results: dict[str, list[ProgramRecord]], summaries: dict[str, RunSummary]) -> None:
    base, ours = (results[s] for s in SYSTEMS)
    print(
        f"\n{'program':<28} {'turns':>5}  {'hit tok vLLM':>12} {'hit tok ours':>12}"
        f"  {'JCT vLLM s':>10} {'JCT ours s':>10}"
    )
    for b, o in zip(base, ours, strict=True):
        print(
            f"{b.program_id:<28} {len(o.turns):>5}  {b.prefix_hit_tokens:>12} "
            f"{o.prefix_hit_tokens:>12}  {b.jct_s:>10.2f} {o.jct_s:>10.2f}"
        )
    sb, so = (summaries[s] for s in SYSTEMS)
    print(f"\n{'':<22} {'vLLM':>10} {'ours':>10} {'vLLM/ours':>10}")
    for key in ("avg_jct_s", "p95_jct_s"):
        b, o = getattr(sb, key), getattr(so, key)
        print(f"{key:<22} {b:>10.2f} {o:>10.2f} {b / o:>10.2f}")
    print(f"{'prefix_hit_ratio':<22} {sb.prefix_hit_ratio:>10.2f} {so.prefix_hit_ratio:>10.2f}")
    for system, records in results.items():
        if failed := sum(r.error is not None for r in records):
            print(f"WARNING: {failed} programs failed on {system}", file=sys.stderr)


def plot(results: dict[str, list[ProgramRecord]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.program_id.split("__")[-1] for r in results[SYSTEMS[0]]]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    width = 0.4
    for k, system in enumerate(SYSTEMS):
        ax.bar(
            [x + (k - 0.5) * width for x in xs],
            [r.jct_s for r in results[system]],
            width,
            label=system,
        )
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("job completion time (s)")
    ax.set_title("SWE-bench programs on the CPU build: vLLM vs continuum-tiered")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(args: argparse.Namespace, _passthrough: list[str]) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = write_tiny_llama(args.out / "model", DEMO_SHAPE)
    programs = demo_programs(args)
    results = {system: run_system(system, model_dir, programs, args) for system in SYSTEMS}
    summaries = {s: summarize_records(s, 1 / args.interarrival, r) for s, r in results.items()}
    print_tables(results, summaries)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                s: {
                    "summary": summaries[s].to_json(),
                    "failed_programs": sum(x.error is not None for x in r),
                    "programs": [dataclasses.asdict(x) for x in r],
                }
                for s, r in results.items()
            },
            indent=2,
        )
    )
    plot(results, args.out / "jct.png")
    print(f"\nwrote {args.out / 'results.json'} and {args.out / 'jct.png'}")
    return 0
