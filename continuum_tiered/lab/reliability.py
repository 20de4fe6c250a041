"""Shared pieces of the reliability benchmarks (``experiments/soak.py``, ``experiments/chaos.py``).

- :class:`PinnedPortServer`: a :class:`~continuum_tiered.core.server_process.ServerProcess`
  on a port chosen once, so that a server killed mid-run can be started again at the same URL.
- :func:`engine_processes` / :class:`RssSampler`: the server's API, EngineCore (the
  scheduler) and Worker processes, and their resident memory over a run.
- :func:`kv_state` / :func:`tick`: the KV blocks and pins the server reports on
  ``/metrics``. vLLM updates those gauges, and the connector expires pins, only while the
  engine steps; :func:`tick` sends a one-token request so that an idle engine takes a step.
- :func:`compare_turns`: greedy outputs of completed turns against a reference server's.
- :func:`log_problems`: error and warning lines of a server log, counted by kind.

No vLLM import: the scripts that use this run the engines as child processes.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from continuum_tiered.core.server_process import ServerProcess, prometheus_samples

# Process titles vLLM gives its engine processes (setproctitle).
ENGINE_CORE_TITLE = "VLLM::EngineCore"
WORKER_TITLE = "VLLM::Worker"
ROLES = ("api", "engine_core", "worker")

PIN_GAUGES = ("vllm:continuum_active_pins", "vllm:continuum_pinned_blocks")
KV_USAGE = "vllm:kv_cache_usage_perc"
PIN_COUNTERS = ("pins_created", "pin_expirations", "pin_releases_pressure", "pin_handovers")
PREFIX_SOURCES = ("gpu", "cpu", "disk", "recompute")


class PinnedPortServer(ServerProcess):
    """A server command on a fixed port (a free one by default), restartable in place."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ):
        super().__init__(command, log_path, env, port)
        self.starts = 0
        self.first_log = log_path

    def start(self, timeout_s: float = 300.0) -> PinnedPortServer:
        self.starts += 1
        if self.starts > 1:  # keep the earlier runs' output: the next one in NAME.K.log
            self.log_path = self.first_log.with_name(f"{self.first_log.stem}.{self.starts}.log")
        super().start(timeout_s)
        return self

    def kill_api_server(self) -> int:
        """SIGKILL the API server process only (what ``kill -9 PID`` of the server does);
        its pid."""
        assert self.process is not None
        pid = self.process.pid
        os.kill(pid, signal.SIGKILL)
        self.process.wait()
        return pid

    def kill_group(self) -> None:
        """SIGKILL every process of the server's group (a crash of the whole server)."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.process.wait()


def engine_processes(root_pid: int) -> dict[str, psutil.Process]:
    """The server's processes by role: ``api`` (``root_pid``), ``engine_core`` and
    ``worker`` (found by their process titles among its descendants)."""
    try:
        root = psutil.Process(root_pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {"api": root}
    for child in children:
        try:
            name = child.name()
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        for role, title in (("engine_core", ENGINE_CORE_TITLE), ("worker", WORKER_TITLE)):
            if role not in found and (title in name or cmdline.startswith(title)):
                found[role] = child
    return found


def process_group_members(pgid: int) -> list[int]:
    """Pids still alive in process group ``pgid`` (a killed server's leftovers)."""
    alive = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.info["pid"]) == pgid and process.status() != "zombie":
                alive.append(process.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


@dataclass
class ProcessUsage:
    """One process's resident memory (bytes), open files and threads."""

    rss: int
    fds: int
    threads: int


def usage_of(processes: Mapping[str, psutil.Process]) -> dict[str, ProcessUsage]:
    usage = {}
    for role, process in processes.items():
        try:
            with process.oneshot():
                usage[role] = ProcessUsage(
                    process.memory_info().rss, process.num_fds(), process.num_threads()
                )
        except psutil.Error:
            continue
    return usage


class RssSampler:
    """Samples the server's processes' RSS every ``interval_s`` in a thread; keeps the
    peak of each role and every sample (seconds since the start, RSS by role). Use as a
    context manager around the run."""

    def __init__(self, root_pid: int, interval_s: float = 1.0):
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.peak: dict[str, int] = {}
        self.series: list[tuple[float, dict[str, int]]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def sample(self) -> None:
        rss = {role: u.rss for role, u in usage_of(engine_processes(self.root_pid)).items()}
        for role, value in rss.items():
            self.peak[role] = max(self.peak.get(role, 0), value)
        self.series.append((time.monotonic() - self._t0, rss))

    def at_fractions(self, role: str, fractions: Sequence[float]) -> list[int]:
        """The role's RSS at each fraction of the sampled time (the sample nearest it)."""
        points = [(t, rss[role]) for t, rss in self.series if role in rss]
        if not points:
            return []
        end = points[-1][0]
        return [min(points, key=lambda p: abs(p[0] - f * end))[1] for f in fractions]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@dataclass
class KvState:
    """What ``/metrics`` says about the KV pool and pins, and the connector's counters."""

    usage_perc: float
    active_pins: float
    pinned_blocks: float
    counters: dict[str, float] = field(default_factory=dict)

    def blocks_in_use(self, num_blocks: int) -> float:
        return self.usage_perc * num_blocks

    @property
    def pins_gone(self) -> bool:
        return self.active_pins == 0 and self.pinned_blocks == 0


def kv_state(url: str) -> KvState:
    samples = prometheus_samples(url, "vllm:")
    counters = {
        name.removeprefix("vllm:continuum_").removesuffix("_total"): value
        for name, value in samples.items()
        if name.startswith("vllm:continuum_") and name.endswith("_total")
    }
    return KvState(
        samples.get(KV_USAGE, 0.0),
        samples.get(PIN_GAUGES[0], 0.0),
        samples.get(PIN_GAUGES[1], 0.0),
        counters,
    )


def tick(url: str, model: str, timeout_s: float = 30.0) -> None:
    """One one-token request without hints: the engine takes a step, expiring pins past
    their deadline and refreshing the KV gauges. It holds one block while it runs."""
    body = {"model": model, "prompt": [5], "max_tokens": 1, "temperature": 0.0}
    httpx.post(f"{url}/v1/completions", json=body, timeout=timeout_s).raise_for_status()


def wait_for_pins_gone(
    url: str, model: str, timeout_s: float, poll_s: float = 2.0
) -> tuple[KvState, float]:
    """Tick the engine until the server reports no pin (or ``timeout_s`` passes); the
    last state and the seconds it took."""
    start = time.monotonic()
    while True:
        tick(url, model)
        time.sleep(0.3)  # the step's stats reach the API process's gauges
        state = kv_state(url)
        waited = time.monotonic() - start
        if state.pins_gone or waited >= timeout_s:
            return state, waited
        time.sleep(poll_s)


# ------------------------------------------------------------------ output comparison

TurnKey = tuple[str, str, int]  # scenario, program id, turn


@dataclass(frozen=True)
class Mismatch:
    key: TurnKey
    expected: tuple[int, ...]
    got: tuple[int, ...]

    @property
    def first_difference(self) -> int:
        """Index of the first differing token (the shorter length where one is a prefix)."""
        for i, (a, b) in enumerate(zip(self.expected, self.got, strict=False)):
            if a != b:
                return i
        return min(len(self.expected), len(self.got))


@dataclass
class Comparison:
    compared: int = 0
    missing_reference: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


def compare_turns(
    observed: Mapping[TurnKey, Sequence[int]], reference: Mapping[TurnKey, Sequence[int]]
) -> Comparison:
    """Each observed turn's output token ids against the reference's for the same key.

    A turn the reference lacks is counted as ``missing_reference``, not compared; an
    output that differs in any token or in length is a mismatch.
    """
    result = Comparison()
    for key, got in observed.items():
        expected = reference.get(key)
        if expected is None:
            result.missing_reference += 1
            continue
        result.compared += 1
        if list(got) != list(expected):
            result.mismatches.append(Mismatch(key, tuple(expected), tuple(got)))
    return result


# ------------------------------------------------------------------ server logs

_LEVEL = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback)\b")
_NOISE = re.compile(r"\d+(\.\d+)?|0x[0-9a-f]+|cmpl-[0-9a-f-]+|'[^']*'|\"[^\"]*\"")


def log_problems(lines: Iterable[str]) -> collections.Counter[str]:
    """Error, warning and traceback lines, with numbers, ids and quoted values masked so
    that repeats of one message count together."""
    found: collections.Counter[str] = collections.Counter()
    for line in lines:
        match = _LEVEL.search(line)
        if match is None:
            continue
        text = re.sub(r"\x1b\[[0-9;]*m", "", line[match.start() :]).strip()
        found[_NOISE.sub("#", text)[:160]] += 1
    return found


def format_problems(problems: collections.Counter[str], limit: int = 12) -> list[str]:
    return [f"{count:>6} x {text}" for text, count in problems.most_common(limit)]


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MiB"
