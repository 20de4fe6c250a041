"""Tool-duration shifts for robustness checks: the same programs with tools that behave
differently from what a policy has learned.

- ``slow_tools_after``: every tool ``factor`` times slower in the programs that arrive
  after the first ``fraction`` of them (a drift mid-trace: a slower sandbox, a loaded CI).
- ``bimodal_tools``: each call short (under ``short_max_s``) with probability
  ``1 - long_share``, else around ``long_s`` (a test suite that sometimes runs for real).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from continuum_tiered.traces.model import TraceProgram, Turn


def _with_durations(program: TraceProgram, duration: Callable[[Turn], float]) -> TraceProgram:
    turns = tuple(dataclasses.replace(t, tool_duration_s=duration(t)) for t in program.turns)
    return dataclasses.replace(program, turns=turns)


def slow_tools_after(
    programs: Sequence[TraceProgram], factor: float = 10.0, fraction: float = 0.5
) -> list[TraceProgram]:
    """Programs in arrival order; the later ``1 - fraction`` get tools ``factor``x slower."""
    if not (factor > 0 and 0 <= fraction <= 1):
        raise ValueError(f"need factor > 0 and 0 <= fraction <= 1, got {factor}, {fraction}")
    ordered = sorted(programs, key=lambda p: p.arrival_s)
    first = round(len(ordered) * fraction)
    return ordered[:first] + [
        _with_durations(p, lambda t: t.tool_duration_s * factor) for p in ordered[first:]
    ]


def bimodal_tools(
    programs: Sequence[TraceProgram],
    seed: int,
    long_share: float = 0.1,
    short_max_s: float = 1.0,
    long_s: float = 60.0,
) -> list[TraceProgram]:
    """Every call redrawn: uniform in [0.05 s, ``short_max_s``), or ``long_s`` +- 10%."""
    if not (0 <= long_share <= 1 and short_max_s > 0.05 and long_s > 0):
        raise ValueError(
            f"need 0 <= long_share <= 1, short_max_s > 0.05 and long_s > 0, got "
            f"{long_share}, {short_max_s}, {long_s}"
        )
    rng = random.Random(seed)

    def draw(_: Turn) -> float:
        if rng.random() < long_share:
            return rng.uniform(0.9 * long_s, 1.1 * long_s)
        return rng.uniform(0.05, short_max_s)

    return [_with_durations(p, draw) for p in programs]
