"""``continuum-tiered trace``: convert agent traces to the trace format, print their statistics.

- ``trace convert --from NAME|PATH --out trace.jsonl``: write a trace JSONL of a named
  trace (swebench, miniswe, bfcl, claude-code, codex) or a path (see
  :func:`~continuum_tiered.traces.arrivals.load_named_trace` for the sources), optionally
  with Poisson program arrivals (``--jps``).
- ``trace stats NAME|PATH``: programs, turns, tokens, tool durations and pauses of a trace.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from continuum_tiered.traces.arrivals import NAMES, load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.coding_agents import TAIL_MAX_S, TAIL_MIN_S
from continuum_tiered.traces.model import TraceProgram, write_trace

SOURCE_HELP = f"{', '.join(NAMES)}, a trace JSONL, or mini-swe-agent *.traj.json files' folder"


def add_trace_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trace", help="convert agent traces, print trace statistics")
    commands = p.add_subparsers(dest="trace_command", required=True)

    convert = commands.add_parser("convert", help="write a trace JSONL for replays")
    convert.add_argument("--from", dest="source", required=True, help=SOURCE_HELP)
    convert.add_argument("--out", type=Path, required=True, help="the trace JSONL to write")
    convert.add_argument(
        "--jps", type=float, help="Poisson arrivals, programs per second (default: keep)"
    )
    _add_load_options(convert)
    convert.set_defaults(run=run_convert)

    stats = commands.add_parser("stats", help="programs, turns, tokens, tool durations")
    stats.add_argument("source", help=SOURCE_HELP)
    _add_load_options(stats)
    stats.set_defaults(run=run_stats)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--programs", type=int, help="first N programs (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of tool durations and arrivals")
    p.add_argument("--token-scale", type=float, default=1.0, help="multiplies token counts")


def _load(args: argparse.Namespace) -> list[TraceProgram]:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    return load_named_trace(args.source, args.programs, args.seed, args.token_scale)


def run_convert(args: argparse.Namespace, passthrough: list[str]) -> int:
    programs = _load(args)
    if args.jps is not None:
        programs = with_poisson_arrivals(programs, args.jps, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_trace(programs, args.out)
    turns = sum(len(p.turns) for p in programs)
    print(f"wrote {len(programs)} programs, {turns} turns to {args.out}")
    return 0


def run_stats(args: argparse.Namespace, passthrough: list[str]) -> int:
    print(format_stats(args.source, trace_stats(_load(args))))
    return 0


@dataclass(frozen=True)
class Row:
    label: str
    values: Sequence[float]
    digits: int = 0


def trace_stats(programs: Sequence[TraceProgram]) -> list[Row]:
    """Distributions of a trace. Tool durations are those of turns that call a tool,
    each program's last turn excepted (its pause is never replayed). Pauses are those of
    every turn but the last, tool-less ones (human waits) included. The heavy tail shows
    as each program's share of pause time spent in pauses of 1 s to 10 min (programs that
    never pause excepted): the pauses long enough for a pin to hold memory idle."""
    turns = [t for p in programs for t in p.turns]
    pauses = [[t.tool_duration_s for t in p.turns[:-1]] for p in programs]
    return [
        Row("turns per program", [len(p.turns) for p in programs], digits=1),
        Row("prompt tokens per turn", [t.prompt_tokens for t in turns]),
        Row("output tokens per turn", [t.output_tokens for t in turns]),
        Row("prompt tokens per program", [sum(t.prompt_tokens for t in p.turns) for p in programs]),
        Row(
            "final context per program",
            [p.turns[-1].prompt_tokens + p.turns[-1].output_tokens for p in programs],
        ),
        Row(
            "tool duration (s)",
            [t.tool_duration_s for p in programs for t in p.turns[:-1] if t.tool is not None],
            digits=3,
        ),
        Row("pause (s)", [x for program in pauses for x in program], digits=3),
        Row(
            "% pause time in 1 s-10 min",
            [100 * _long_time(program) / sum(program) for program in pauses if sum(program) > 0],
            digits=1,
        ),
    ]


def _long_time(pauses: Sequence[float]) -> float:
    """Seconds in pauses as long as real coding agents' long tool calls (1 s to 10 min)."""
    return sum(x for x in pauses if TAIL_MIN_S <= x <= TAIL_MAX_S)


def format_stats(name: str, rows: Sequence[Row]) -> str:
    header = ["", "n", "mean", "std", "min", "median", "p90", "max"]
    lines = [f"trace {name}", "".join(f"{h:>12}" if h else f"{h:<28}" for h in header)]
    for row in rows:
        v = np.asarray(row.values, dtype=float)
        if v.size == 0:
            lines.append(f"{row.label:<28}{0:>12}")
            continue
        stats = [v.mean(), v.std(), v.min(), np.median(v), np.percentile(v, 90), v.max()]
        cells = "".join(f"{x:>12,.{row.digits}f}" for x in stats)
        lines.append(f"{row.label:<28}{len(v):>12,}{cells}")
    return "\n".join(lines)
