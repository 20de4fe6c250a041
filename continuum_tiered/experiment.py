"""Live-server experiments: several serving systems on the same model, memory and programs.

Each system gets its own server, started after the previous one stopped (one engine on
the machine at a time), and the same programs replayed in real time
(:mod:`continuum_tiered.agent_runner`). With repeats the systems run in rounds, every
system once and then again, so that a slow spell of a shared machine falls on all of them
rather than on one. :mod:`continuum_tiered.experiment_report` writes the report.

Systems that cannot run here (LMCache needs a GPU) are skipped with their reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from continuum_tiered.agent_runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.metrics import RunSummary
from continuum_tiered.server import (
    ServerProcess,
    continuum_serve_command,
    prometheus_samples,
    tiny_engine_flags,
    vllm_command,
)
from continuum_tiered.tiny_model import TinyLlamaShape
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram

# The random Llama of the CPU runs: big enough that prefilling the scaled trace contexts
# (a few thousand tokens) takes about as long as a tool call on two cores, so a prefix
# lost during a tool call costs real time; small enough to start in seconds.
DEMO_SHAPE = TinyLlamaShape(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
)
CPU_KV_BLOCKS = 256  # 32-token blocks: fewer than the programs' contexts together
CPU_TOKEN_SCALE = 0.25  # SWE-bench contexts of ~10k tokens become a few thousand


@dataclass(frozen=True)
class Engine:
    """What every system of one experiment is served with: model, memory, engine flags."""

    model: str
    served_name: str  # the model name requests carry
    flags: tuple[str, ...] = ()

    @classmethod
    def random_cpu(cls, model_dir: Path, kv_blocks: int) -> Engine:
        """A random-weight model on the CPU build, with a KV pool of ``kv_blocks`` blocks."""
        return cls(str(model_dir), "tiny", tuple(tiny_engine_flags(model_dir, kv_blocks)))


CommandBuilder = Callable[[Engine], list[str]]


def vanilla(*vllm_flags: str) -> CommandBuilder:
    """Plain vLLM, reporting prefix-cache hits in its replies' usage."""
    return lambda engine: vllm_command(
        engine.model, *engine.flags, "--enable-prompt-tokens-details", *vllm_flags
    )


def plugin(*serve_options: str) -> CommandBuilder:
    """``continuum-tiered serve`` with ``serve_options`` (its defaults without any)."""
    return lambda engine: continuum_serve_command(engine.model, *serve_options, *engine.flags)


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None where there is none (or no driver)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def lmcache_unavailable() -> str | None:
    """Why LMCache cannot run here, or None."""
    if gpu_name() is None:
        return "no GPU: LMCache's connector does not run on vLLM's CPU build"
    try:
        importlib.import_module("lmcache")
    except Exception as err:  # any failure to import means no LMCache system
        return f"the lmcache package does not import ({type(err).__name__}: {err})"
    return None


def tiers_unavailable() -> str:
    return lmcache_unavailable() or (
        "continuum-tiered serve cannot put LMCache's tiers under ContinuumConnector yet "
        "(it owns --kv-transfer-config and no lower-tier hook is wired)"
    )


@dataclass(frozen=True)
class System:
    name: str
    command: CommandBuilder | None  # None: no server command exists for it yet
    send_hints: bool  # program priority and connector hints; vanilla vLLM rejects a priority
    env: Mapping[str, str] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here

    def skip_reason(self) -> str | None:
        return self.unavailable() or (None if self.command else "no server command")


# LMCache's CPU tier, configured through its environment variables; values already in the
# environment win.
LMCACHE_ENV = {
    name: os.environ.get(name, default)
    for name, default in {
        "LMCACHE_CHUNK_SIZE": "256",
        "LMCACHE_LOCAL_CPU": "True",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "40",  # GB
    }.items()
}
LMCACHE_CONFIG = json.dumps({"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"})

VLLM = System("vllm", vanilla(), send_hints=False)
VLLM_LMCACHE = System(
    "vllm+lmcache",
    vanilla("--kv-transfer-config", LMCACHE_CONFIG),
    send_hints=False,
    env=LMCACHE_ENV,
    unavailable=lmcache_unavailable,
)
CONTINUUM_TIERED = System("continuum-tiered", plugin(), send_hints=True)
BASELINES = (VLLM, VLLM_LMCACHE, CONTINUUM_TIERED)
# The paper's ablation: each step adds one piece to the one before.
ABLATION = (
    VLLM,
    System("fcfs", plugin("--policy", "none"), send_hints=True),
    System(
        "fcfs+ttl-2s",
        plugin("--policy", "static-ttl", "--policy-option", "ttl_s=2"),
        send_hints=True,
    ),
    System("fcfs+cost-ttl", plugin("--policy", "continuum"), send_hints=True),
    System("fcfs+cost-ttl+tiers", None, send_hints=True, unavailable=tiers_unavailable),
)


@dataclass
class SystemRun:
    """One system's replay of the programs, on a server of its own."""

    system: str
    repeat: int  # from 1
    command: list[str]
    records: list[ProgramRecord]
    summary: RunSummary
    counters: dict[str, float]  # the connector's Prometheus counters; empty for vanilla vLLM

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary.to_json(),
            "failed_programs": self.failed,
            "connector_counters": self.counters,
            "programs": [dataclasses.asdict(r) for r in self.records],
        }


@dataclass
class Results:
    runs: dict[str, list[SystemRun]]  # by system, in order, one per repeat
    skipped: dict[str, str]  # system -> why


def trace_programs(
    trace: str, programs: int, turns: int, token_scale: float, jps: float, seed: int
) -> list[TraceProgram]:
    """The first ``programs`` programs of a trace, cut to ``turns`` turns, arriving as a
    Poisson process of ``jps`` programs per second."""
    loaded = load_named_trace(trace, programs=programs, seed=seed, token_scale=token_scale)
    cut = [dataclasses.replace(p, turns=p.turns[:turns]) for p in loaded]
    return with_poisson_arrivals(cut, jps, seed)


def connector_counters(url: str) -> dict[str, float]:
    """The plugin's counters from the server's Prometheus endpoint (none on vanilla vLLM)."""
    return {
        name.removeprefix("vllm:continuum_").removesuffix("_total"): value
        for name, value in prometheus_samples(url, "vllm:continuum_").items()
        if name.endswith("_total")
    }


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def run_system(
    system: System,
    repeat: int,
    programs: Sequence[TraceProgram],
    engine: Engine,
    out_dir: Path,
    jps: float,
    seed: int,
    on_done: Callable[[ProgramRecord], None],
) -> SystemRun:
    assert system.command is not None, f"{system.name} has no server command"
    command = system.command(engine)
    log = out_dir / "logs" / f"{slug(system.name)}-{repeat}.log"
    tqdm.write(f"[{system.name}] run {repeat}: starting the server (log: {log}) ...")
    with ServerProcess(command, log, env=dict(system.env)) as server:
        options = RunnerOptions(model=engine.served_name, send_hints=system.send_hints, seed=seed)
        records = asyncio.run(run_programs(server.url, programs, options, on_done))
        counters = connector_counters(server.url)
    if counters:
        tqdm.write(f"[{system.name}] {', '.join(f'{k}={v:g}' for k, v in counters.items())}")
    summary = summarize_records(system.name, jps, records)
    return SystemRun(system.name, repeat, command, records, summary, counters)


def run_experiment(
    systems: Sequence[System],
    programs: Sequence[TraceProgram],
    engine: Engine,
    out_dir: Path,
    *,
    jps: float,
    repeats: int = 1,
    seed: int = 0,
) -> Results:
    """Every runnable system ``repeats`` times on ``programs``; server logs go to
    ``out_dir/logs``. ``jps`` only labels the summaries (arrivals are in ``programs``)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    skipped = {s.name: reason for s in systems if (reason := s.skip_reason())}
    for name, reason in skipped.items():
        print(f"[{name}] skipped: {reason}", flush=True)
    runnable = [s for s in systems if s.name not in skipped]
    runs: dict[str, list[SystemRun]] = {s.name: [] for s in runnable}
    total = repeats * len(runnable) * len(programs)
    with tqdm(total=total, unit="program", desc="experiment") as bar:
        for repeat in range(1, repeats + 1):
            for system in runnable:
                bar.set_postfix_str(f"{system.name}, run {repeat}/{repeats}")
                run = run_system(
                    system, repeat, programs, engine, out_dir, jps, seed, lambda _: bar.update()
                )
                runs[system.name].append(run)
    return Results(runs, skipped)
