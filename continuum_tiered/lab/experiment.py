"""Live-server experiments: several serving systems on the same model, memory and programs.

Each system gets its own server, started after the previous one stopped (one engine on
the machine at a time), and the same programs replayed in real time
(:mod:`continuum_tiered.replay.runner`). With repeats the systems run in rounds, every
system once and then again, so that a slow spell of a shared machine falls on all of them
rather than on one. Before each run the experiment waits for other vLLM servers on the
machine to stop, and records the load average around the run.
:mod:`continuum_tiered.lab.report` writes the report.

On vLLM's CPU build LMCache runs through the plugin's CPU KV connector
(:mod:`continuum_tiered.vllm.lmcache.cpu_build`); on a GPU it runs as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from tqdm import tqdm

from continuum_tiered.core.metrics import RunSummary
from continuum_tiered.core.server_process import (
    BLOCK_SIZE,
    MIN_KV_BLOCKS,
    ServerProcess,
    continuum_serve_command,
    prometheus_samples,
    tiny_engine_flags,
    vllm_command,
)
from continuum_tiered.core.tiny_model import TinyLlamaShape
from continuum_tiered.replay.runner import (
    ProgramRecord,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.vllm.plugin import LMCACHE_CONNECTOR_NAME
from continuum_tiered.vllm.serve import RESERVED_CPU_ENV, kv_transfer_config
from continuum_tiered.vllm.tiers import Tiers

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
# vLLM's CPU build binds the engine's worker to the cores it does not reserve for the
# scheduler, and reserves one more core when any KV connector is configured (meant for NIXL).
# On two cores that leaves none: the worker then spreads its OpenMP threads over both,
# spin-waiting against the scheduler and API server, and decodes several times slower than
# vanilla vLLM's worker bound to one core. ``continuum-tiered serve`` asks for one core by
# itself (``serve.cpu_core_reservation``); a plain vLLM server with LMCache's connector needs
# it said. The same reservation for every system keeps the comparison about KV and
# scheduling rather than thread placement.
CPU_ENGINE_ENV = {RESERVED_CPU_ENV: "1"}
# The demo model's profile (``continuum-tiered profile --device cpu`` on a 2-core machine):
# its prefill time and KV bytes per token, and the CPU and disk tiers' bandwidths.
CPU_PROFILE = "cpu-demo-llama"


@dataclass(frozen=True)
class TierSizes:
    """LMCache's tiers for the systems that have them: CPU memory, then a disk folder of
    each run's own (removed after the run). Sizes as ``--tiers`` reads them."""

    cpu: str
    disk: str

    def spec(self, scratch: Path) -> str:
        """``continuum-tiered serve --tiers`` with the disk tier under ``scratch``."""
        return f"cpu={self.cpu},disk={scratch}:{self.disk}:cleanup"


# The 8 programs x 8 turns of the CPU runs end with ~18k tokens of context, 144 MiB of the
# demo model's KV (8 KiB/token); the KV pool holds 64 MiB. A CPU tier of the pool's size
# holds under half of it, so the older chunks live on disk only (LMCache writes every
# chunk to both tiers and evicts the CPU copy first).
CPU_TIERS = TierSizes(cpu="64MiB", disk="1GiB")
GPU_TIERS = TierSizes(cpu="32GiB", disk="128GiB")


@dataclass(frozen=True)
class ServedModel:
    """What every system of one experiment is served with: model, memory, engine flags,
    LMCache tiers, and the plugin's own options (its profile)."""

    model: str
    served_name: str  # the model name requests carry
    flags: tuple[str, ...] = ()
    tiers: TierSizes = GPU_TIERS
    plugin_options: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # for every system's server

    @classmethod
    def random_cpu(
        cls, model_dir: Path, kv_blocks: int, tiers: TierSizes = CPU_TIERS
    ) -> ServedModel:
        """A random-weight model on the CPU build, with a KV pool of ``kv_blocks`` blocks."""
        return cls(
            str(model_dir),
            "tiny",
            tuple(tiny_engine_flags(model_dir, kv_blocks)),
            tiers,
            ("--profile", CPU_PROFILE),
            CPU_ENGINE_ENV,
        )

    def with_kv_blocks(self, kv_blocks: int) -> ServedModel:
        """This random-weight CPU engine (:meth:`random_cpu`) with a pool of ``kv_blocks``."""
        return dataclasses.replace(
            self, flags=tuple(tiny_engine_flags(Path(self.model), kv_blocks))
        )


def bound_kv_blocks(programs: Sequence[TraceProgram]) -> int:
    """A pool for every program's final context at once, as the virtual replay's unlimited
    pool (:func:`continuum_tiered.sim.simulate.unlimited_blocks`) sizes it for the same
    programs; its margin of one block per running request counts one per program, since a
    program runs one turn at a time."""
    # Imported here: the replay module loads vLLM's config machinery (seconds), which the
    # demo's command line does not need.
    from continuum_tiered.core.deployment import Deployment
    from continuum_tiered.sim.simulate import unlimited_blocks

    deployment = Deployment(block_size=BLOCK_SIZE, max_num_seqs=len(programs))
    return unlimited_blocks(deployment, list(programs))


def check_cpu_pool(
    kv_blocks: int, programs: Sequence[TraceProgram], shape: TinyLlamaShape = DEMO_SHAPE
) -> str | None:
    """Check ``--kv-blocks`` against the random model and the programs, before any server
    starts.

    A pool holding more tokens than the model has positions is fine: every block stays in
    the pool and a request is capped at the positions (``tiny_engine_flags``); the note
    returned says so. A pool or model too small for the programs' longest turn (prompt and
    output) raises ValueError naming the fix: its requests would be refused.
    """
    if kv_blocks < MIN_KV_BLOCKS:
        raise ValueError(f"--kv-blocks must be at least {MIN_KV_BLOCKS}, got {kv_blocks}")
    pool_tokens = (kv_blocks - 1) * BLOCK_SIZE  # block 0 is vLLM's null block
    positions = shape.max_position_embeddings
    longest = max((t.prompt_tokens + t.output_tokens for p in programs for t in p.turns), default=0)
    if longest > positions:
        raise ValueError(
            f"the programs' longest turn is {longest} tokens, more than the random model's "
            f"{positions} positions; lower --token-scale or --turns"
        )
    if longest > pool_tokens:
        need = -(-longest // BLOCK_SIZE) + 1
        raise ValueError(
            f"--kv-blocks {kv_blocks} holds {pool_tokens} tokens, fewer than the programs' "
            f"longest turn ({longest} tokens); use --kv-blocks {need} or more"
        )
    if pool_tokens > positions:
        return (
            f"note: --kv-blocks {kv_blocks} holds {pool_tokens} tokens, more than the random "
            f"model's {positions} positions: the pool keeps all {kv_blocks} blocks and one "
            f"request is capped at {positions} tokens (--max-model-len {positions})"
        )
    return None


# A server command for one run; the folder is the run's own, for a disk tier.
CommandBuilder = Callable[[ServedModel, Path], list[str]]


def vanilla(*vllm_flags: str) -> CommandBuilder:
    """Plain vLLM, reporting prefix-cache hits in its replies' usage."""
    return lambda engine, _scratch: vllm_command(
        engine.model, *engine.flags, "--enable-prompt-tokens-details", *vllm_flags
    )


def vanilla_lmcache(engine: ServedModel, scratch: Path) -> list[str]:
    """Plain vLLM with LMCache's own connector and the same tiers and LMCache settings as
    ``continuum-tiered serve --tiers`` (on the CPU build the plugin's entry point gives
    LMCache our CPU KV connector; nothing else of the plugin is used)."""
    tiers = Tiers.parse(engine.tiers.spec(scratch))
    config = kv_transfer_config(LMCACHE_CONNECTOR_NAME, tiers.lmcache_config())
    return vanilla("--kv-transfer-config", json.dumps(config))(engine, scratch)


def plugin(*serve_options: str, tiers: bool = False) -> CommandBuilder:
    """``continuum-tiered serve`` with ``serve_options`` (its defaults without any), and
    with LMCache's tiers below the pins when ``tiers``."""

    def command(engine: ServedModel, scratch: Path) -> list[str]:
        tier_options = ("--tiers", engine.tiers.spec(scratch)) if tiers else ()
        return continuum_serve_command(
            engine.model, *engine.plugin_options, *serve_options, *tier_options, *engine.flags
        )

    return command


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


@dataclass(frozen=True)
class System:
    name: str
    command: CommandBuilder
    send_hints: bool  # program priority and connector hints; vanilla vLLM rejects a priority


VLLM = System("vllm", vanilla(), send_hints=False)
BOUND = "vllm-bound"


def vllm_bound(kv_blocks: int) -> System:
    """Vanilla vLLM on the random CPU model with a pool of ``kv_blocks`` (from
    :func:`bound_kv_blocks`) instead of the experiment's: no prefix is ever evicted, the
    real engine's bound on what keeping KV across tool calls can buy."""

    def command(engine: ServedModel, scratch: Path) -> list[str]:
        return vanilla()(engine.with_kv_blocks(kv_blocks), scratch)

    return System(BOUND, command, send_hints=False)


VLLM_LMCACHE = System("vllm+lmcache", vanilla_lmcache, send_hints=False)
# The full system: the default policy (tiered) with LMCache's tiers.
CONTINUUM_TIERED = System("continuum-tiered", plugin(tiers=True), send_hints=True)
BASELINES = (VLLM, VLLM_LMCACHE, CONTINUUM_TIERED)
# The paper's ablation, each step adding one piece to the one before, then our policy.
ABLATION = (
    VLLM,
    System("fcfs", plugin("--policy", "none"), send_hints=True),
    System(
        "fcfs+ttl-2s",
        plugin("--policy", "static-ttl", "--policy-option", "ttl_s=2"),
        send_hints=True,
    ),
    System("fcfs+cost-ttl", plugin("--policy", "continuum"), send_hints=True),
    System("fcfs+cost-ttl+tiers", plugin("--policy", "continuum", tiers=True), send_hints=True),
    System("+tiered-policy", plugin("--policy", "tiered", tiers=True), send_hints=True),
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
    load: tuple[float, float] = (math.nan, math.nan)  # 1-minute load average: start, end

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary.to_json(),
            "failed_programs": self.failed,
            "load_average_1m": {"start": self.load[0], "end": self.load[1]},
            "connector_counters": self.counters,
            "programs": [dataclasses.asdict(r) for r in self.records],
        }


@dataclass
class Results:
    runs: dict[str, list[SystemRun]]  # by system, in order, one per repeat


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


VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def other_vllm_servers() -> list[int]:
    """Pids of vLLM API servers on the machine that this process did not start."""
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.info["pid"] not in ours and VLLM_SERVER_MODULE in (
            process.info["cmdline"] or ()
        ):
            found.append(process.info["pid"])
    return found


def wait_for_quiet_machine(max_wait_s: float = 600.0, poll_s: float = 30.0) -> None:
    """Wait until no other vLLM server runs (they would share the cores with ours); after
    ``max_wait_s`` go on with a warning, and the run's load average tells the reader."""
    deadline = time.monotonic() + max_wait_s
    while servers := other_vllm_servers():
        if time.monotonic() >= deadline:
            tqdm.write(f"WARNING: other vLLM servers still run (pids {servers}); going on")
            return
        tqdm.write(f"waiting for other vLLM servers to stop (pids {servers}) ...")
        time.sleep(poll_s)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def run_system(
    system: System,
    repeat: int,
    programs: Sequence[TraceProgram],
    engine: ServedModel,
    out_dir: Path,
    jps: float,
    seed: int,
    on_done: Callable[[ProgramRecord], None],
    wait_s: float,
) -> SystemRun:
    name = f"{slug(system.name)}-{repeat}"
    scratch = out_dir / "tiers" / name  # the run's disk tier, if it has one
    scratch.mkdir(parents=True, exist_ok=True)
    command = system.command(engine, scratch)
    log = out_dir / "logs" / f"{name}.log"
    wait_for_quiet_machine(wait_s)
    tqdm.write(f"[{system.name}] run {repeat}: starting the server (log: {log}) ...")
    try:
        with ServerProcess(command, log, dict(engine.env)) as server:
            load_start = os.getloadavg()[0]
            options = RunnerOptions(
                model=engine.served_name, send_hints=system.send_hints, seed=seed
            )
            records = asyncio.run(run_programs(server.url, programs, options, on_done))
            load_end = os.getloadavg()[0]
            counters = connector_counters(server.url)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tqdm.write(f"[{system.name}] load average {load_start:.2f} -> {load_end:.2f}")
    if counters:
        tqdm.write(f"[{system.name}] {', '.join(f'{k}={v:g}' for k, v in counters.items())}")
    summary = summarize_records(system.name, jps, records)
    return SystemRun(
        system.name, repeat, command, records, summary, counters, (load_start, load_end)
    )


def run_experiment(
    systems: Sequence[System],
    programs: Sequence[TraceProgram],
    engine: ServedModel,
    out_dir: Path,
    *,
    jps: float,
    repeats: int = 1,
    seed: int = 0,
    wait_s: float = 600.0,
) -> Results:
    """Every system ``repeats`` times on ``programs``; server logs go to ``out_dir/logs``.
    ``jps`` only labels the summaries (arrivals are in ``programs``). Each run first waits
    up to ``wait_s`` for other vLLM servers on the machine to stop."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs: dict[str, list[SystemRun]] = {s.name: [] for s in systems}
    total = repeats * len(systems) * len(programs)
    with tqdm(total=total, unit="program", desc="experiment") as bar:
        for repeat in range(1, repeats + 1):
            for system in systems:
                bar.set_postfix_str(f"{system.name}, run {repeat}/{repeats}")
                run = run_system(
                    system,
                    repeat,
                    programs,
                    engine,
                    out_dir,
                    jps,
                    seed,
                    lambda _: bar.update(),
                    wait_s,
                )
                runs[system.name].append(run)
    return Results(runs)


def add_run_options(p: argparse.ArgumentParser, repeats_help: str) -> None:
    """``--seed``, ``--repeats`` and ``--wait-for-servers``, shared by the demo and the
    experiments."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help=repeats_help)
    p.add_argument(
        "--wait-for-servers",
        type=float,
        default=600.0,
        metavar="S",
        help="before each run, wait up to S seconds for other vLLM servers on the machine "
        "to stop (they would share its cores)",
    )
