"""Chaos: no wrong output and nothing hangs when the tiers, the server or the proxy's
upstream fail under running agent programs.

Method. Each scenario starts its own ``continuum-tiered serve --tiers`` (tiny random Llama
of :mod:`continuum_tiered.core.tiny_model`, default policy unless ``--policy``, a small KV pool
and CPU tier so that turns come back from LMCache's CPU and disk tiers) and runs the same
multi-turn programs against it: each turn's prompt is the previous prompt, the previous
reply's token ids and fresh ids; greedy decoding (temperature 0, seed 0, ``max_tokens``
fixed, ``ignore_eos``); a tool pause between turns. ``--fault-at`` seconds in, the fault:

- ``control``: none.
- ``disk-deleted``: the disk tier's directory is removed (``rm -rf``).
- ``disk-full``: the disk tier's filesystem (a tmpfs mounted for the run, needs root) is
  written full for ``--full-for`` seconds, then the filler is removed. Without root the
  tier's size budget is filled instead: a file of the budget's size in the tier's folder.
- ``server-killed``: the server's API process gets SIGKILL; after ``--orphan-wait``
  seconds any of its processes still alive are killed too, and the server is started again
  on the same port (and disk tier). The programs retry and go on against the new server.
- ``proxy-upstream-gone``: the programs talk to ``continuum-tiered proxy`` (program id in
  ``X-Program-Id``, no hints of their own); its upstream server is killed (SIGKILL, every
  process), stays down for ``--down-for`` seconds, then starts again on the same port.

A failed request (no answer, a 5xx, a dropped connection) is retried with backoff for up to
``--retry-window`` seconds; an attempt still unanswered after ``--request-timeout`` seconds
counts as hung. When every scenario is done, a plain vLLM server (no connector, same model,
flags and KV pool) answers the very same prompts of every completed turn, program by
program, and each turn's output token ids must be identical. A mismatch is then asked of
plain vLLM again, alone, to tell a batch-dependent numeric difference (plain vLLM itself
answers differently alone) from a wrong KV.

Prints one row per scenario: programs, turns completed, turns compared, mismatches, error
answers, failed turns, hung attempts, the longest attempt, and notes on the fault (how fast
the proxy answered 502, how long the outage lasted, processes left over). Exit status 1 on
any mismatch, hung attempt or failed turn.

    .venv/bin/python experiments/chaos.py [--scenarios control,disk-deleted,...] [--out out/chaos]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from continuum_tiered.core.server_process import (
    free_port,
    plugin_server_command,
    vanilla_server_command,
)
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.reliability import (
    PREFIX_SOURCES,
    Comparison,
    PinnedPortServer,
    compare_turns,
    format_problems,
    kv_state,
    log_problems,
    process_group_members,
)
from continuum_tiered.vllm.tiers import DISK_SUBDIR

SCENARIOS = ("control", "disk-deleted", "disk-full", "server-killed", "proxy-upstream-gone")
MODEL = "tiny"
VOCAB = (3, 500)  # token ids drawn for fresh context: [low, high)
TMPFS_SIZE = "24m"  # the disk-full scenario's filesystem; the tier's budget is below it
TMPFS_TIER = "16MiB"
PROXY_HEADER = "X-Program-Id"
LAST_TURN_HEADER = "X-Program-Last-Turn"


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class ProgramShape:
    turns: int = 8
    first_tokens: int = 600  # turn 0's prompt: a few 256-token LMCache chunks
    new_tokens: int = 48  # fresh ids after each reply
    output_tokens: int = 16
    pause_s: tuple[float, float] = (0.3, 1.5)  # tool pause, uniform


@dataclass
class Attempt:
    at_s: float  # since the scenario's start
    latency_s: float
    status: int | None  # HTTP status; None: no answer (transport error or timeout)
    error: str | None = None

    @property
    def hung(self) -> bool:
        return self.error is not None and self.error.startswith("timeout")


@dataclass
class TurnResult:
    prompt: list[int]
    output: list[int] | None = None
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class ProgramResult:
    program_id: str
    turns: list[TurnResult] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Route:
    """Where a scenario's programs send their turns and how they name their program."""

    url: str
    via_proxy: bool = False  # program id in a header, no priority or hints in the body


@dataclass(frozen=True)
class RetryRules:
    request_timeout_s: float = 60.0
    retry_window_s: float = 300.0
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0


def fresh_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def request_body(
    prompt: Sequence[int], shape: ProgramShape, hints: dict | None, priority: int | None
) -> dict:
    body: dict = {
        "model": MODEL,
        "prompt": list(prompt),
        "max_tokens": shape.output_tokens,
        "temperature": 0.0,
        "seed": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if hints is not None:
        body["kv_transfer_params"] = {"continuum": hints}
    if priority is not None:
        body["priority"] = priority
    return body


def is_retryable(status: int | None) -> bool:
    return status is None or status in (408, 429) or status >= 500


async def send_turn(
    client: httpx.AsyncClient,
    route: Route,
    body: dict,
    headers: dict[str, str],
    rules: RetryRules,
    t0: float,
) -> tuple[list[int] | None, list[Attempt], str | None]:
    """One turn, retried; its output token ids (None if it failed), attempts and error."""
    attempts: list[Attempt] = []
    first = time.monotonic()
    delay = rules.backoff_s
    while True:
        start = time.monotonic()
        status: int | None = None
        error: str | None = None
        output: list[int] | None = None
        try:
            async with asyncio.timeout(rules.request_timeout_s):
                response = await client.post(
                    f"{route.url}/v1/completions", json=body, headers=headers
                )
            status = response.status_code
            if status == 200:
                output = response.json()["choices"][0]["token_ids"]
            else:
                error = f"HTTP {status}: {response.text[:200]}"
        except TimeoutError:
            error = f"timeout: no answer within {rules.request_timeout_s:g} s"
        except (httpx.HTTPError, ValueError, KeyError) as err:
            error = f"{type(err).__name__}: {err}"
        attempts.append(Attempt(start - t0, time.monotonic() - start, status, error))
        if output is not None:
            return output, attempts, None
        out_of_time = time.monotonic() - first + delay > rules.retry_window_s
        if not is_retryable(status) or out_of_time:
            return None, attempts, error
        await asyncio.sleep(delay)
        delay = min(delay * 2, rules.max_backoff_s)


async def run_program(
    client: httpx.AsyncClient,
    route: Route,
    program_id: str,
    arrival_s: float,
    shape: ProgramShape,
    rules: RetryRules,
    seed: int,
    t0: float,
) -> ProgramResult:
    await asyncio.sleep(max(0.0, t0 + arrival_s - time.monotonic()))
    rng = random.Random(f"{seed}:{program_id}")
    result = ProgramResult(program_id)
    priority = int(time.time() * 1000)
    context = fresh_tokens(rng, shape.first_tokens)
    for turn in range(shape.turns):
        last = turn == shape.turns - 1
        if route.via_proxy:
            headers = {PROXY_HEADER: program_id}
            if last:
                headers[LAST_TURN_HEADER] = "true"
            body = request_body(context, shape, None, None)
        else:
            headers = {}
            hints = {"program_id": program_id, "turn": turn, "last_turn": last}
            body = request_body(context, shape, hints, priority)
        record = TurnResult(list(context))
        result.turns.append(record)
        record.output, record.attempts, error = await send_turn(
            client, route, body, headers, rules, t0
        )
        if record.output is None:
            result.error = f"turn {turn}: {error}"
            break
        context += record.output + fresh_tokens(rng, shape.new_tokens)
        if not last:
            await asyncio.sleep(rng.uniform(*shape.pause_s))
    return result


async def run_programs(
    route: Route,
    programs: int,
    interarrival_s: float,
    shape: ProgramShape,
    rules: RetryRules,
    seed: int,
    fault: Callable[[], None] | None = None,
    fault_at_s: float = 0.0,
) -> tuple[list[ProgramResult], float, float]:
    """Every program from its arrival, concurrently; ``fault`` runs in a thread
    ``fault_at_s`` seconds in (the programs go on meanwhile). Results, the run's start
    (``time.monotonic()``, which attempts' ``at_s`` count from) and its length."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.monotonic()
        tasks = [
            run_program(client, route, f"p{k:03d}", k * interarrival_s, shape, rules, seed, t0)
            for k in range(programs)
        ]

        async def inject() -> None:
            if fault is not None:
                await asyncio.sleep(fault_at_s)
                await asyncio.to_thread(fault)

        *results, _ = await asyncio.gather(*tasks, inject())
        return list(results), t0, time.monotonic() - t0


# --------------------------------------------------------------------------- reference


async def reference_outputs(
    url: str,
    turns_by_program: dict[tuple[str, str], list[tuple[int, list[int]]]],
    shape: ProgramShape,
    concurrency: int = 4,
) -> dict[tuple[str, str, int], list[int]]:
    """Plain vLLM's output for every (scenario, program)'s turns, each program's turns in
    order, ``concurrency`` programs at a time."""
    outputs: dict[tuple[str, str, int], list[int]] = {}
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120.0) as client:

        async def program(key: tuple[str, str], turns: list[tuple[int, list[int]]]) -> None:
            async with gate:
                for turn, prompt in turns:
                    response = await client.post(
                        f"{url}/v1/completions", json=request_body(prompt, shape, None, None)
                    )
                    response.raise_for_status()
                    outputs[(*key, turn)] = response.json()["choices"][0]["token_ids"]

        await asyncio.gather(*(program(k, t) for k, t in turns_by_program.items()))
    return outputs


def completed_turns(
    results: dict[str, list[ProgramResult]],
) -> tuple[dict[tuple[str, str], list[tuple[int, list[int]]]], dict[tuple[str, str, int], list]]:
    """The prompts (by scenario and program) and outputs (by scenario, program, turn) of
    every turn that got an answer."""
    prompts: dict[tuple[str, str], list[tuple[int, list[int]]]] = {}
    outputs: dict[tuple[str, str, int], list] = {}
    for scenario, programs in results.items():
        for program in programs:
            for turn, record in enumerate(program.turns):
                if record.output is not None:
                    prompts.setdefault((scenario, program.program_id), []).append(
                        (turn, record.prompt)
                    )
                    outputs[(scenario, program.program_id, turn)] = record.output
    return prompts, outputs


def alone(url: str, prompt: list[int], shape: ProgramShape) -> list[int]:
    response = httpx.post(
        f"{url}/v1/completions", json=request_body(prompt, shape, None, None), timeout=120
    )
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


# --------------------------------------------------------------------------- faults


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` on ``path`` for the block; yields False (nothing mounted)
    where mounting is refused (not root)."""
    if os.geteuid() != 0:
        yield False
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        print(f"cannot mount a tmpfs ({mounted.stderr.strip()}); filling the budget instead")
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_filesystem(path: Path) -> int:
    """Write zeros to ``path`` until its filesystem has no space left; bytes written."""
    written = 0
    fd = os.open(path, os.O_CREAT | os.O_WRONLY)
    try:
        while True:
            written += os.write(fd, bytes(1 << 16))
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    return written


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


@dataclass
class Scenario:
    name: str
    notes: list[str] = field(default_factory=list)
    results: list[ProgramResult] = field(default_factory=list)
    duration_s: float = 0.0
    t0: float = 0.0  # time.monotonic() at the start of the programs
    logs: list[Path] = field(default_factory=list)


def wait_until(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


class Runner:
    def __init__(self, args: argparse.Namespace, model: Path):
        self.args = args
        self.model = model
        self.shape = ProgramShape(turns=args.turns, output_tokens=args.output_tokens)
        self.rules = RetryRules(args.request_timeout, args.retry_window)

    def tiered_server(self, disk_root: Path, disk_size: str, log: Path) -> PinnedPortServer:
        options = ["--tiers", f"cpu={self.args.cpu_tier},disk={disk_root}:{disk_size}"]
        if self.args.policy:
            options += ["--policy", self.args.policy]
        for item in self.args.policy_option:
            options += ["--policy-option", item]
        command = plugin_server_command(self.model, self.args.kv_blocks, *options)
        return PinnedPortServer(command, log)

    def play(self, scenario: Scenario, route: Route, fault: Callable[[], None] | None) -> None:
        scenario.results, scenario.t0, scenario.duration_s = asyncio.run(
            run_programs(
                route,
                self.args.programs,
                self.args.interarrival,
                self.shape,
                self.rules,
                self.args.seed,
                fault,
                self.args.fault_at,
            )
        )

    def run(self, name: str, work: Path) -> Scenario:
        scenario = Scenario(name)
        disk_root = work / f"{name}-disk"
        disk_root.mkdir(parents=True, exist_ok=True)
        log = work / "logs" / f"{name}.log"
        if name == "disk-full":
            with tmpfs(disk_root, TMPFS_SIZE) as mounted:
                self._disk_full(scenario, disk_root, log, mounted)
        elif name == "proxy-upstream-gone":
            self._proxy(scenario, disk_root, log, work)
        else:
            server = self.tiered_server(disk_root, self.args.disk_tier, log)
            try:
                server.start()
                fault = {
                    "control": None,
                    "disk-deleted": lambda: self._delete_disk(scenario, disk_root),
                    "server-killed": lambda: self._kill_and_restart(scenario, server),
                }[name]
                self.play(scenario, Route(server.url), fault)
                if name == "disk-deleted":
                    again = files_under(disk_root / DISK_SUBDIR)
                    scenario.notes.append(
                        f"tier dir {'re-created' if (disk_root / DISK_SUBDIR).exists() else 'gone'}"
                        f" at the end, {len(again)} files in it"
                    )
                scenario.notes.append(sources_note(server.url))
            finally:
                server.stop()
            scenario.logs = self._logs(log, server.starts)
        shutil.rmtree(disk_root, ignore_errors=True)
        return scenario

    @staticmethod
    def _logs(log: Path, starts: int) -> list[Path]:
        return [log] + [log.with_name(f"{log.stem}.{k}.log") for k in range(2, starts + 1)]

    def _delete_disk(self, scenario: Scenario, disk_root: Path) -> None:
        tier = disk_root / DISK_SUBDIR
        files = files_under(tier)
        shutil.rmtree(tier)
        scenario.notes.append(f"removed the tier dir with {len(files)} files")

    def _disk_full(self, scenario: Scenario, disk_root: Path, log: Path, mounted: bool) -> None:
        size = TMPFS_TIER if mounted else self.args.disk_tier
        server = self.tiered_server(disk_root, size, log)
        filler = disk_root / "filler" if mounted else disk_root / DISK_SUBDIR / "filler"

        def fault() -> None:
            if mounted:
                written = fill_filesystem(filler)
                free = shutil.disk_usage(disk_root).free
                how = f"tmpfs {TMPFS_SIZE} filled ({written >> 20} MiB filler, {free} B free)"
            else:
                filler.write_bytes(bytes(server_budget_bytes(size)))
                how = f"no root: a {size} file written into the tier's {size} budget"
            scenario.notes.append(how)
            time.sleep(self.args.full_for)
            filler.unlink()
            scenario.notes.append(f"freed after {self.args.full_for:g} s")

        try:
            server.start()
            self.play(scenario, Route(server.url), fault)
            scenario.notes.append(f"{len(files_under(disk_root / DISK_SUBDIR))} tier files at end")
            scenario.notes.append(sources_note(server.url))
        finally:
            server.stop()
        scenario.logs = [log]

    def _kill_and_restart(self, scenario: Scenario, server: PinnedPortServer) -> None:
        killed_at = time.monotonic()
        pgid = server.kill_api_server()
        wait_until(lambda: not process_group_members(pgid), self.args.orphan_wait)
        left = process_group_members(pgid)
        if left:
            scenario.notes.append(
                f"{len(left)} server processes still alive {self.args.orphan_wait:g} s after "
                f"the API server's SIGKILL ({', '.join(map(str, left))}); killed"
            )
            server.kill_group()
            wait_until(lambda: not process_group_members(pgid), 30)
        else:
            scenario.notes.append("engine processes exited with the API server")
        server.start()
        scenario.notes.append(
            f"SIGKILL -> new server ready in {time.monotonic() - killed_at:.0f} s"
        )

    def _proxy(self, scenario: Scenario, disk_root: Path, log: Path, work: Path) -> None:
        upstream = self.tiered_server(disk_root, self.args.disk_tier, log)
        port = free_port()
        proxy_log = work / "logs" / "proxy.log"
        proxy_command = [
            sys.executable,
            "-m",
            "continuum_tiered.cli",
            "proxy",
            "--upstream",
            upstream.url,
            "--port",
            str(port),
        ]
        proxy_url = f"http://127.0.0.1:{port}"
        with proxy_log.open("wb") as out:
            proxy = subprocess.Popen(
                proxy_command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        down: dict[str, float] = {}

        def fault() -> None:
            down["killed"] = time.monotonic()
            upstream.kill_group()
            time.sleep(self.args.down_for)
            down["restarting"] = time.monotonic()
            upstream.start()
            down["ready"] = time.monotonic()

        try:
            upstream.start()
            if not wait_until(lambda: _answers(f"{proxy_url}/v1/models"), 60):
                raise RuntimeError(f"the proxy does not answer; see {proxy_log}")
            self.play(scenario, Route(proxy_url, via_proxy=True), fault)
            scenario.notes.append(sources_note(upstream.url))
        finally:
            upstream.stop()
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        scenario.logs = [*self._logs(log, upstream.starts), proxy_log]
        scenario.notes += proxy_notes(scenario.results, down, scenario.t0)


def sources_note(url: str) -> str:
    """Returning turns' prompt tokens by source, as the (last) server counted them."""
    try:
        counters = kv_state(url).counters
    except (OSError, ValueError) as err:
        return f"no /metrics ({err})"
    counts = "/".join(f"{counters.get(f'prefix_tokens_from_{s}', 0):.0f}" for s in PREFIX_SOURCES)
    return f"prefix tokens {'/'.join(PREFIX_SOURCES)}: {counts}"


def server_budget_bytes(size: str) -> int:
    from continuum_tiered.vllm.tiers import parse_size

    return parse_size(size, "disk")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def proxy_notes(results: list[ProgramResult], down: dict[str, float], t0: float) -> list[str]:
    """How the proxy answered while its upstream was down and restarting."""
    if "killed" not in down:
        return ["the upstream was never killed (the programs ended first)"]
    attempts = [a for r in results for t in r.turns for a in t.attempts]
    killed = down["killed"] - t0
    ready = down.get("ready", float("inf")) - t0
    # Attempts that overlap the outage: in flight at the kill, or sent before the restart.
    during = [a for a in attempts if a.at_s < ready and a.at_s + a.latency_s > killed]
    gateway = [a for a in during if a.status in (502, 503, 504)]
    in_flight = [a for a in during if a.at_s < killed]
    after = [a for a in attempts if a.at_s >= ready and a.status == 200]
    notes = [
        f"upstream down {killed:.1f}-{ready:.1f} s: {len(during)} attempts, "
        f"{len(gateway)} answered {sorted({a.status for a in gateway})}"
        + (f" within {max(a.latency_s for a in gateway):.2f} s" if gateway else ""),
        f"{len(in_flight)} in flight at the kill: "
        + (", ".join(str(a.status or a.error) for a in in_flight) or "none"),
    ]
    other = [a for a in during if a.status not in (502, 503, 504, 200)]
    if other:
        notes.append(f"{len(other)} other outcomes while down: {other[0].error}")
    slow = [a for a in during if a.latency_s > 5]
    if slow:
        notes.append(
            f"{len(slow)} attempts during the outage took > 5 s (longest "
            f"{max(a.latency_s for a in slow):.1f} s): {slow[0].status or slow[0].error}"
        )
    if after:
        first = min(a.at_s for a in after)
        notes.append(f"first 200 after the restart {first - ready:.2f} s after it was ready")
    return notes


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    scenario: str
    programs_ok: int
    programs: int
    turns: int
    compared: int
    mismatches: int
    errors: int  # attempts answered with an error or not at all (retried or not)
    failed_turns: int
    hung: int
    max_latency_s: float


def scenario_row(scenario: Scenario, comparison: Comparison) -> Row:
    attempts = [a for r in scenario.results for t in r.turns for a in t.attempts]
    return Row(
        scenario.name,
        sum(r.error is None for r in scenario.results),
        len(scenario.results),
        sum(t.output is not None for r in scenario.results for t in r.turns),
        comparison.compared,
        len(comparison.mismatches),
        sum(a.status != 200 for a in attempts),
        sum(r.error is not None for r in scenario.results),
        sum(a.hung for a in attempts),
        max((a.latency_s for a in attempts), default=0.0),
    )


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | programs ok | turns completed | turns compared | mismatches | "
        "error answers | failed turns | hung | max latency s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.programs_ok}/{r.programs} | {r.turns} | {r.compared} | "
            f"{r.mismatches} | {r.errors} | {r.failed_turns} | {r.hung} | "
            f"{r.max_latency_s:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    p.add_argument("--programs", type=int, default=12, help="programs per scenario")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--interarrival", type=float, default=1.0, help="seconds between programs")
    p.add_argument("--fault-at", type=float, default=6.0, help="seconds into the scenario")
    p.add_argument("--full-for", type=float, default=8.0, help="disk-full: seconds full")
    p.add_argument("--down-for", type=float, default=8.0, help="proxy: seconds upstream down")
    p.add_argument(
        "--orphan-wait",
        type=float,
        default=15.0,
        help="server-killed: seconds the engine processes get to exit by themselves",
    )
    p.add_argument("--request-timeout", type=float, default=60.0, help="one attempt; then hung")
    p.add_argument("--retry-window", type=float, default=300.0)
    p.add_argument("--kv-blocks", type=int, default=64)
    p.add_argument("--cpu-tier", default="2MiB")
    p.add_argument("--disk-tier", default="64MiB")
    p.add_argument("--policy", help="retention policy (default: serve's default)")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/chaos"))
    args = p.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown or not args.scenarios:
        p.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.programs < 1 or args.turns < 1 or args.output_tokens < 1:
        p.error("--programs, --turns and --output-tokens must be >= 1")
    if args.request_timeout <= 0 or args.retry_window <= 0:
        p.error("--request-timeout and --retry-window must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model = write_tiny_llama(args.out / "model")
    runner = Runner(args, model)
    scenarios: list[Scenario] = []
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = Path(tmp)
        (work / "logs").mkdir()
        for name in args.scenarios:
            print(f"[{name}] running {args.programs} programs x {args.turns} turns ...", flush=True)
            scenario = runner.run(name, work)
            scenarios.append(scenario)
            print(f"[{name}] done in {scenario.duration_s:.0f} s; {'; '.join(scenario.notes)}")
            for path in scenario.logs:
                if path.exists():
                    shutil.copy(path, args.out / path.name)
        results = {s.name: s.results for s in scenarios}
        prompts, outputs = completed_turns(results)
        print(f"[reference] plain vLLM on {len(outputs)} turns ...", flush=True)
        reference_log = work / "logs" / "reference.log"
        vanilla = vanilla_server_command(model, args.kv_blocks, "--enable-prompt-tokens-details")
        with PinnedPortServer(vanilla, reference_log) as server:
            reference = asyncio.run(reference_outputs(server.url, prompts, runner.shape))
            comparison_by = {
                s.name: compare_turns(
                    {k: v for k, v in outputs.items() if k[0] == s.name}, reference
                )
                for s in scenarios
            }
            recheck = {}
            for comparison in comparison_by.values():
                for mismatch in comparison.mismatches[:20]:
                    scenario, program, turn = mismatch.key
                    prompt = dict(prompts[(scenario, program)])[turn]
                    recheck[mismatch.key] = [alone(server.url, prompt, runner.shape) for _ in "ab"]
        shutil.copy(reference_log, args.out / "reference.log")

    rows = [scenario_row(s, comparison_by[s.name]) for s in scenarios]
    print("\n## Chaos figures\n")
    print(
        f"{args.programs} programs x {args.turns} turns per scenario ({runner.shape.first_tokens}"
        f"-token first prompt, +{runner.shape.new_tokens} fresh tokens and the reply each turn, "
        f"{args.output_tokens} greedy output tokens), fault at {args.fault_at:g} s; KV pool "
        f"{args.kv_blocks} blocks, tiers cpu={args.cpu_tier} disk={args.disk_tier}, "
        f"policy {args.policy or 'default'}; attempt timeout {args.request_timeout:g} s\n"
    )
    print(format_table(rows))
    print()
    for s in scenarios:
        print(f"- {s.name}: {'; '.join(s.notes) or 'no fault'}")
    bad = False
    for s in scenarios:
        comparison = comparison_by[s.name]
        for mismatch in comparison.mismatches[:20]:
            again = recheck.get(mismatch.key, [])
            alone_agrees = any(list(mismatch.got) == a for a in again)
            self_consistent = all(a == list(mismatch.expected) for a in again)
            print(
                f"  MISMATCH {mismatch.key}: first difference at token "
                f"{mismatch.first_difference}; expected {list(mismatch.expected)}, got "
                f"{list(mismatch.got)}; plain vLLM alone: {again} "
                f"({'same as the reference' if self_consistent else 'differs from itself'}"
                f"{', agrees with ours' if alone_agrees else ''})"
            )
        for program in s.results:
            if program.error:
                print(f"  FAILED {s.name}/{program.program_id}: {program.error}")
        bad |= bool(comparison.mismatches) or any(r.error for r in s.results)
    bad |= any(r.hung for r in rows)
    print("\nserver logs (error/warning lines, most frequent first):")
    for s in scenarios:
        problems = log_problems(
            line
            for path in s.logs
            if (args.out / path.name).exists()
            for line in (args.out / path.name).read_text(errors="replace").splitlines()
        )
        print(f"- {s.name}: {sum(problems.values())} lines")
        for line in format_problems(problems, limit=8):
            print(f"  {line}")
    (args.out / "results.json").write_text(
        json.dumps({s.name: [asdict(r) for r in s.results] for s in scenarios})
    )
    print(f"\ntotal {time.monotonic() - started:.0f} s; logs and results.json in {args.out}")
    return 1 if bad else 0
