"""Named traces and program arrivals, for replays.

``load_named_trace`` resolves a trace by name or path; ``with_poisson_arrivals`` spreads
programs over time as a Poisson process: exponential gaps of mean ``1 / jps`` seconds, the
first one after the start, so ``n`` programs arrive in about ``n / jps`` seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Sequence
from pathlib import Path

from continuum_tiered.traces.bfcl import load_bfcl
from continuum_tiered.traces.build import BuildOptions, rescale
from continuum_tiered.traces.coding_agents import CODING_AGENTS, load_coding_agent
from continuum_tiered.traces.miniswe import SUFFIX, load_miniswe
from continuum_tiered.traces.model import TraceProgram, read_trace
from continuum_tiered.traces.openhands import load_openhands
from continuum_tiered.traces.swebench import load_swebench

log = logging.getLogger(__name__)

SHARED_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"
SWEBENCH_FULL = SHARED_TRACES / "swebench_gemini3_programs.jsonl"
MINISWE_RAW = SHARED_TRACES / "raw"
NAMES = ("swebench", "miniswe", "bfcl", "openhands", *CODING_AGENTS)


def with_poisson_arrivals(
    programs: Sequence[TraceProgram], jps: float, seed: int
) -> list[TraceProgram]:
    """``programs`` in order, arriving as a Poisson process of ``jps`` programs per second."""
    if not jps > 0:
        raise ValueError(f"arrival rate must be > 0 programs per second, got {jps}")
    rng = random.Random(seed)
    arrival, timed = 0.0, []
    for program in programs:
        arrival += rng.expovariate(jps)
        timed.append(dataclasses.replace(program, arrival_s=arrival))
    return timed


def swebench_path() -> Path | None:
    """The full SWE-bench trace beside the repository when present, else ``None`` (the
    loaders' embedded 50-program slice)."""
    if SWEBENCH_FULL.is_file():
        log.info("swebench: the full trace %s", SWEBENCH_FULL)
        return SWEBENCH_FULL
    log.info("swebench: %s not found, using the embedded 50-program slice", SWEBENCH_FULL)
    return None


def load_named_trace(
    name_or_path: str | Path,
    programs: int | None = None,
    seed: int = 0,
    token_scale: float = 1.0,
) -> list[TraceProgram]:
    """The first ``programs`` programs of a named trace or a trace file.

    - ``"swebench"``: ../shared/traces/swebench_gemini3_programs.jsonl beside the repository
      when present (500 programs), else the embedded 50-program slice.
    - ``"miniswe"``: the raw mini-swe-agent trajectories in ../shared/traces/raw/.
    - ``"bfcl"``: the BFCL v4 multi-turn tasks of the installed ``bfcl-eval`` package.
    - ``"openhands"``: 50 OpenHands 0.15 runs on SWE-bench Verified, with their recorded
      tool gaps (:mod:`~continuum_tiered.traces.openhands`).
    - ``"claude-code"``, ``"codex"``: the ``"swebench"`` programs with that coding agent's
      heavy-tailed tool times and human waits (:mod:`~continuum_tiered.traces.coding_agents`).
    - a folder or a ``*.traj.json`` file: mini-swe-agent 1.x trajectories.
    - any other path: a trace JSONL, validated by :func:`read_trace`.

    ``seed`` draws the converted sources' pauses (tool durations, human waits);
    ``token_scale`` multiplies every token count (trace files included).
    """
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be >= 1, got {programs}")
    options = BuildOptions(token_scale=token_scale, seed=seed)
    name = str(name_or_path)
    if name == "swebench":
        return load_swebench(swebench_path(), options=options, limit=programs)
    if name in CODING_AGENTS:
        return load_coding_agent(name, options, programs, swebench_path())
    if name == "bfcl":
        return load_bfcl(options=options, limit=programs)
    if name == "openhands":
        return load_openhands(options=options, limit=programs)
    path = MINISWE_RAW if name == "miniswe" else Path(name)
    if not path.exists():
        raise ValueError(f"no trace {name!r}: expected {', '.join(NAMES)} or an existing path")
    if path.is_dir() or path.name.endswith(SUFFIX):
        return load_miniswe([path], options=options)[:programs]
    return [rescale(p, token_scale) for p in read_trace(path)[:programs]]
