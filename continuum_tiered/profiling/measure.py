"""What the measurements share: the plan, timing, size grids, memory limits, link fits."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from continuum_tiered.core.profile import Tier

MAX_CONTEXT_TOKENS = 131_072  # the largest context a transfer is measured for
BLOCK_TOKENS = {"cuda": 16, "cpu": 32}  # vLLM's block size: default on GPU, minimum on CPU
MIN_SAMPLE_S = 1e-3  # short operations repeat inside one sample until it lasts this long
_MAX_INNER = 1000


class ProfilingError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full grid, or the reduced one of ``--quick``."""

    size_step: int  # consecutive transfer sizes differ by this factor
    transfer_repeats: int
    disk_repeats: int
    prefill_repeats: int
    prefill_points: int | None  # at most this many context lengths; None: all of them
    decode_batches: tuple[int, ...]
    decode_contexts: int
    decode_repeats: int


FULL = Plan(4, 7, 3, 5, None, (1, 4, 16, 64), 4, 7)
QUICK = Plan(16, 3, 2, 2, 4, (1, 8), 2, 3)


@dataclass(frozen=True)
class Series:
    """Median time of one kind of transfer at each size."""

    tier: str  # the profile tier it describes: "cpu" or "disk"
    label: str  # what moved, e.g. "pinned host->device"
    reload: bool  # the direction that brings KV back to the device
    sizes: tuple[int, ...]  # bytes
    seconds: tuple[float, ...]
    backends: tuple[str, ...]  # the library that gave each time, e.g. "torch", "cupy"

    @property
    def large_size_bandwidth(self) -> float:
        """Throughput of the largest transfer, where latency no longer counts."""
        return self.sizes[-1] / self.seconds[-1]


@dataclass(frozen=True)
class Timed:
    """One transfer of one size, timed (median): e.g. one direction of a tier while the
    other direction runs throughout."""

    tier: str  # the profile tier it describes ("cpu", "disk"), or "host"
    label: str  # what moved, e.g. "pinned host->device during device->host"
    nbytes: int
    seconds: float

    @property
    def bandwidth(self) -> float:
        return self.nbytes / self.seconds


@contextmanager
def background_load(op: Callable[[], object]) -> Iterator[None]:
    """Another thread runs ``op`` over and over from before the block starts until it ends.

    ``op`` has run once when the block starts, so whatever it warms up is warm; an error
    in it is raised when the block ends (the block was then not timed under load).
    """
    stop, started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            op()
            started.set()
            while not stop.is_set():
                op()
        except BaseException as exc:  # handed to the timing thread below
            errors.append(exc)
        finally:
            started.set()

    thread = threading.Thread(target=loop, name="profile-background-load", daemon=True)
    thread.start()
    started.wait()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if errors:
        raise ProfilingError(f"the concurrent load failed: {errors[0]!r}") from errors[0]


def median_seconds(
    op: Callable[[], object],
    sync: Callable[[], None],
    repeats: int,
    min_sample_s: float = MIN_SAMPLE_S,
) -> float:
    """Median over ``repeats`` samples of one ``op`` (then ``sync``), after one warm-up.

    An operation shorter than ``min_sample_s`` runs several times per sample, so a
    microsecond copy is not lost in the timer's resolution.
    """
    start = time.perf_counter()
    op()
    sync()
    warm_up = time.perf_counter() - start
    inner = 1 if warm_up >= min_sample_s else min(_MAX_INNER, int(min_sample_s / warm_up) + 1)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            op()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def transfer_tokens(block_tokens: int, max_tokens: int, step: int) -> list[int]:
    """Token counts from one block up to ``max_tokens`` (always included), ``step`` apart."""
    tokens = []
    n = block_tokens
    while n < max_tokens:
        tokens.append(n)
        n *= step
    return [*tokens, max_tokens]


def max_transfer_tokens(
    kv_bytes_per_token: int, block_tokens: int, max_tokens: int | None, budget_bytes: float
) -> int:
    """The largest context to move: 128k tokens, capped by --max-tokens and memory, in blocks."""
    by_memory = int(budget_bytes // kv_bytes_per_token)
    cap = min(MAX_CONTEXT_TOKENS, max_tokens or MAX_CONTEXT_TOKENS, by_memory)
    if cap < block_tokens:
        raise ProfilingError(
            f"room for {cap} tokens (--max-tokens {max_tokens}, memory for {by_memory}), "
            f"less than one {block_tokens}-token KV block"
        )
    return cap // block_tokens * block_tokens


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (free plus reclaimable cache); free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_note() -> str:
    """How busy the machine was: other work on the same cores inflates every timing."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    note = f"1-minute load average {load:.2f} on {cpus} CPUs at start"
    return note + (" (other work was running: times may be inflated)" if load > cpus / 4 else "")


def fit_link(name: str, series: Series) -> Tier:
    """A tier from a reload series: time = latency + bytes / bandwidth.

    The line goes through the largest transfer, so whole contexts (what a reload moves)
    get their measured time, and the bandwidth is the one seen at that size once the
    latency is taken off. The latency is the intercept that then minimises the relative
    error over the other sizes, so small transfers weigh as much as large ones. It is
    clamped to [0, half the largest transfer]: small copies served from CPU caches can
    pull it below 0, and a larger one would leave no time for the bytes.
    """
    n_max, t_max = series.sizes[-1], series.seconds[-1]
    # time_i = latency * a_i + b_i on the lines through (n_max, t_max); least squares in
    # latency with weights 1 / time_i^2.
    num = den = 0.0
    for n, t in zip(series.sizes[:-1], series.seconds[:-1], strict=True):
        a, b = 1 - n / n_max, n / n_max * t_max
        num += a * (t - b) / (t * t)
        den += a * a / (t * t)
    latency = min(max(num / den if den else 0.0, 0.0), t_max / 2)
    return Tier(name, n_max / (t_max - latency), latency)


def fit_tier(name: str, load: Series, store: Series | None, duplex: list[Timed]) -> Tier:
    """The tier of ``fit_link(load)`` with the store bandwidth of ``store``'s largest transfer
    and the duplex bandwidth of the slower contended direction (one figure bounds both),
    each with the tier's latency taken off, as for the load bandwidth."""
    tier = fit_link(name, load)
    latency = tier.latency_s
    write = (
        None if store is None else rate_after_latency(store.sizes[-1], store.seconds[-1], latency)
    )
    slowest = min(duplex, key=lambda c: c.bandwidth, default=None)
    both = None if slowest is None else rate_after_latency(slowest.nbytes, slowest.seconds, latency)
    return Tier(name, tier.bandwidth_bytes_per_s, latency, write, both)


def rate_after_latency(nbytes: int, seconds: float, latency_s: float) -> float:
    """Bandwidth of a transfer once the tier's latency is taken off; as in ``fit_link``,
    the latency takes at most half of the time."""
    return nbytes / max(seconds - latency_s, seconds / 2)


def nonnegative_lstsq(design: np.ndarray, targets: list[float]) -> tuple[float, ...]:
    """Least squares with every coefficient >= 0, for a handful of columns.

    Tries every subset of columns left free (the rest at 0) and keeps the best feasible
    one: exact, and cheap for three columns.
    """
    y = np.asarray(targets, dtype=float)
    columns = design.shape[1]
    best, best_error = np.zeros(columns), float(y @ y)
    for mask in range(1, 2**columns):
        free = [i for i in range(columns) if mask >> i & 1]
        solution, *_ = np.linalg.lstsq(design[:, free], y, rcond=None)
        if (solution < 0).any():
            continue
        x = np.zeros(columns)
        x[free] = solution
        residual = y - design @ x
        if residual @ residual < best_error:
            best, best_error = x, float(residual @ residual)
    return tuple(float(v) for v in best)
