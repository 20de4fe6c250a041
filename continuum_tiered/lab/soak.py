"""Soak: 1,000 agent programs through ``continuum-tiered replay`` against one
``continuum-tiered serve --tiers`` on vLLM's CPU build, and whether the server comes back
to where it started.

Method. One server, the tiny random Llama of :mod:`continuum_tiered.core.tiny_model`, the
default retention policy and profile (unless ``--policy`` / ``--profile`` say otherwise),
a small KV pool (``--kv-blocks``) and LMCache tiers of ``--cpu-tier`` and ``--disk-tier``
(the disk tier in a temporary folder, removed at the end). The programs are BFCL v4
multi-turn tasks (the first ``--turns`` turns of each; the 800 tasks repeat under new
program ids past the 800th), tokens scaled by ``--token-scale`` and tool pauses by
``--time-scale``, arriving as a Poisson process of ``--jps`` a second; the replay runs as
its own process (its progress bar shows).

Before the replay and after it (once every pin is gone: the engine is ticked with one-token
requests, since pins only expire while it steps) the script reads ``/metrics`` and the
server processes' memory, and prints: programs completed and failed, KV blocks in use,
active pins and pinned blocks at start, right after the last program (idle), and at the
end; RSS of the EngineCore (scheduler), Worker and API processes at start, peak and end;
pin counters; returning turns' prefix tokens by source; error and warning lines of the
server log. Exit status 1 when a program failed or the server did not get back to its
baseline.

    .venv/bin/python experiments/soak.py [--programs 1000] [--jps 1.0] [--out out/soak]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from continuum_tiered.core.server_process import ServerProcess, plugin_server_command
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.reliability import (
    PIN_COUNTERS,
    PREFIX_SOURCES,
    KvState,
    RssSampler,
    engine_processes,
    format_problems,
    kv_state,
    log_problems,
    mib,
    tick,
    usage_of,
    wait_for_pins_gone,
)
from continuum_tiered.traces.arrivals import load_named_trace
from continuum_tiered.traces.model import TraceProgram, write_trace

MODEL = "tiny"  # the served name tiny_engine_flags gives


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--programs", type=int, default=1000)
    p.add_argument("--jps", type=float, default=1.0, help="program arrivals per second")
    p.add_argument("--turns", type=int, default=6, help="first N turns of each program")
    p.add_argument("--token-scale", type=float, default=0.1)
    p.add_argument("--time-scale", type=float, default=0.5, help="multiplies tool pauses")
    p.add_argument("--kv-blocks", type=int, default=64, help="KV pool, in 32-token blocks")
    p.add_argument("--cpu-tier", default="2MiB")
    p.add_argument("--disk-tier", default="256MiB")
    p.add_argument(
        "--tiers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LMCache's CPU and disk tiers (--no-tiers: the plugin alone, to tell a tier's "
        "memory from the rest)",
    )
    p.add_argument("--policy", help="retention policy (default: serve's default)")
    p.add_argument("--profile", help="tier profile (default: serve's default)")
    p.add_argument(
        "--policy-option", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pin-wait-s",
        type=float,
        default=180.0,
        help="after the last program, wait up to this long for every pin to go",
    )
    p.add_argument("--out", type=Path, default=Path("out/soak"))
    args = p.parse_args(argv)
    if args.programs < 1 or args.turns < 1:
        p.error("--programs and --turns must be >= 1")
    if not args.jps > 0 or not args.token_scale > 0 or args.time_scale < 0:
        p.error("--jps and --token-scale must be > 0, --time-scale >= 0")
    return args


def soak_trace(programs: int, turns: int, seed: int) -> list[TraceProgram]:
    """``programs`` BFCL programs cut to ``turns`` turns; past the trace's end it starts
    over, each pass under new program ids (``ID#pass``)."""
    base = load_named_trace("bfcl", seed=seed)
    return [
        dataclasses.replace(
            base[i % len(base)],
            program_id=f"{base[i % len(base)].program_id}#{i // len(base)}",
            turns=base[i % len(base)].turns[:turns],
        )
        for i in range(programs)
    ]


def serve_options(args: argparse.Namespace, disk_root: Path) -> list[str]:
    options = []
    if args.tiers:
        options += ["--tiers", f"cpu={args.cpu_tier},disk={disk_root}:{args.disk_tier}:cleanup"]
    if args.policy:
        options += ["--policy", args.policy]
    if args.profile:
        options += ["--profile", args.profile]
    for item in args.policy_option:
        options += ["--policy-option", item]
    return options


def replay_command(args: argparse.Namespace, url: str, trace: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "continuum_tiered.cli",
        "replay",
        "--endpoint",
        url,
        "--trace",
        str(trace),
        "--jps",
        str(args.jps),
        "--programs",
        str(args.programs),
        "--policy-hints",
        "on",
        "--time-scale",
        str(args.time_scale),
        "--token-scale",
        str(args.token_scale),
        "--seed",
        str(args.seed),
        "--label",
        "soak",
        "--out",
        str(args.out / "replay"),
    ]


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def state_row(label: str, state: KvState, num_blocks: int) -> str:
    return (
        f"| {label} | {state.blocks_in_use(num_blocks):.0f} of {num_blocks} "
        f"({100 * state.usage_perc:.1f}%) | {state.active_pins:g} | {state.pinned_blocks:g} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = write_tiny_llama(args.out / "model")
    trace = args.out / "trace.jsonl"
    write_trace(soak_trace(args.programs, args.turns, args.seed), trace)
    disk_root = Path(tempfile.mkdtemp(prefix="soak-disk-tier-"))
    command = plugin_server_command(model, args.kv_blocks, *serve_options(args, disk_root))
    log = args.out / "server.log"
    print(f"server: {' '.join(command)}\nserver log: {log}", flush=True)
    try:
        with ServerProcess(command, log) as server:
            ready_s = time.monotonic() - started
            tick(server.url, MODEL)  # same footing as the end: one step taken
            time.sleep(1.0)
            start_state = kv_state(server.url)
            start_usage = usage_of(engine_processes(server.process.pid))
            replay = replay_command(args, server.url, trace)
            print(f"replay: {' '.join(replay)}", flush=True)
            replay_started = time.monotonic()
            with RssSampler(server.process.pid) as rss:
                code = subprocess.run(replay).returncode
                replay_s = time.monotonic() - replay_started
                idle_state = kv_state(server.url)  # no tick: as the last step left it
                end_state, waited_s = wait_for_pins_gone(server.url, MODEL, args.pin_wait_s)
            end_usage = usage_of(engine_processes(server.process.pid))
            disk_bytes = sum(p.stat().st_size for p in disk_root.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(disk_root, ignore_errors=True)
    records = read_records(args.out / "replay" / "programs.jsonl")
    failed = [r for r in records if r["error"]]
    problems = log_problems(log.read_text(errors="replace").splitlines())

    n = args.kv_blocks
    print("\n## Soak figures\n")
    print(
        f"{args.programs} BFCL programs x <= {args.turns} turns, {args.jps:g} programs/s, "
        f"tokens x{args.token_scale:g}, tool pauses x{args.time_scale:g}, KV pool {n} blocks, "
        + (f"tiers cpu={args.cpu_tier} disk={args.disk_tier}, " if args.tiers else "no tiers, ")
        + f"policy {args.policy or 'default'}, profile {args.profile or 'default'}"
    )
    print(
        f"server ready after {ready_s:.0f} s; replay {replay_s:.0f} s (exit {code}); "
        f"pins gone {waited_s:.0f} s after the last program; "
        f"total {time.monotonic() - started:.0f} s\n"
    )
    print(f"programs completed: {len(records) - len(failed)}, failed: {len(failed)}")
    turns = sum(len(r["turns"]) for r in records)
    print(f"turns completed: {turns}\n")
    print("| when | KV blocks in use | active pins | pinned blocks |")
    print("|---|---|---|---|")
    print(state_row("start", start_state, n))
    print(state_row("after the last program (idle, no tick)", idle_state, n))
    print(state_row("end (pins gone)", end_state, n))
    back = (
        end_state.pins_gone
        and round(end_state.blocks_in_use(n)) <= round(start_state.blocks_in_use(n))
        and not failed
    )
    print(f"\nback to baseline: {'yes' if back else 'NO'}\n")
    print("| process | RSS start | RSS peak | RSS end | fds start -> end | threads start -> end |")
    print("|---|---|---|---|---|---|")
    for role in ("engine_core", "worker", "api"):
        if role in start_usage and role in end_usage:
            s, e = start_usage[role], end_usage[role]
            print(
                f"| {role} | {mib(s.rss)} | {mib(rss.peak.get(role, 0))} | {mib(e.rss)} | "
                f"{s.fds} -> {e.fds} | {s.threads} -> {e.threads} |"
            )
    fractions = [k / 10 for k in range(11)]
    print(
        f"\nRSS (MiB) at 0%, 10%, ..., 100% of the replay and the wait for pins, sampled "
        f"every {rss.interval_s:g} s:"
    )
    for role in ("engine_core", "worker", "api"):
        values = rss.at_fractions(role, fractions)
        print(f"  {role:<12} {' '.join(f'{v / 2**20:.0f}' for v in values)}")
    counters = end_state.counters
    print("\n| pins created | expired | released under pressure | handed over |")
    print("|---|---|---|---|")
    print("| " + " | ".join(f"{counters.get(c, 0):.0f}" for c in PIN_COUNTERS) + " |")
    total = sum(counters.get(f"prefix_tokens_from_{s}", 0) for s in PREFIX_SOURCES)
    print("\nReturning turns' prompt tokens by source:\n")
    print("| " + " | ".join(PREFIX_SOURCES) + " | tier hits recomputed (declined) |")
    print("|---" * (len(PREFIX_SOURCES) + 1) + "|")
    cells = [
        f"{counters.get(f'prefix_tokens_from_{s}', 0):.0f} "
        f"({100 * counters.get(f'prefix_tokens_from_{s}', 0) / max(total, 1):.1f}%)"
        for s in PREFIX_SOURCES
    ]
    print(f"| {' | '.join(cells)} | {counters.get('tier_hit_tokens_recomputed', 0):.0f} |")
    print(f"\ndisk tier at the end: {mib(disk_bytes)}")
    print(f"server log: {sum(problems.values())} error/warning lines")
    for line in format_problems(problems):
        print(line)
    if failed:
        print(f"\nfirst failed program: {failed[0]['program_id']}: {failed[0]['error']}")
    return 0 if back else 1
