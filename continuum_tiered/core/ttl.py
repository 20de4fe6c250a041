"""Continuum's TTL decision and the running estimates it needs (T_q and eta)."""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from continuum_tiered.core.tool_durations import EmpiricalCDF


class TTLDecision(NamedTuple):
    """A policy's answer for one turn (a named tuple, like ``TurnEnd``: one per turn end)."""

    ttl_s: float
    benefit_s: float  # T_q * eta + ReloadOrPrefill: what a pin saves if the program returns
    source: str  # "cold-start" | "tool" | "global" | "static" | "last-turn" | InferCept's choice
    offload: bool = False  # also copy the KV to the next tier down now (InferCept's swap)


def best_ttl(cdf: EmpiricalCDF, benefit_s: float) -> float:
    """tau* = argmax over {0} and the distinct samples of P(tau) * benefit - tau.

    Ties go to the smallest tau. One pass over the sorted samples: the reference that
    ``fast_best_ttl`` is tested against.
    """
    samples = cdf.samples
    n = len(samples)
    best_tau = 0.0
    best_score = cdf.prob_le(0.0) * benefit_s
    i = 0
    while i < n:
        tau = samples[i]
        while i < n and samples[i] == tau:
            i += 1
        score = (i / n) * benefit_s - tau
        if score > best_score:
            best_tau, best_score = tau, score
    return best_tau


def fast_best_ttl(cdf: EmpiricalCDF, benefit_s: float) -> float:
    """``best_ttl`` as one vectorised pass over the CDF's cached distinct values.

    ``argmax`` returns the first maximum, so exact ties still go to the smallest tau.
    """
    values, probs = cdf.curve
    scores = probs * benefit_s
    scores -= values  # in place: one temporary array, not two
    best = int(scores.argmax())
    return float(values[best]) if scores[best] > 0 else 0.0


def cold_start_ttl(benefit_s: float) -> float:
    """The optimal TTL when tool durations are Exp(1 s): ln(B) for B > 1, else 0."""
    return math.log(benefit_s) if benefit_s > 1.0 else 0.0


class SlidingMean:
    """Mean of the last ``window`` values; 0.0 before the first. Read once per finished
    turn, so the exact sum is kept until the next value arrives."""

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)
        self._mean: float | None = 0.0

    def add(self, x: float) -> None:
        if math.isfinite(x):
            self._values.append(x)
            self._mean = None

    @property
    def count(self) -> int:
        return len(self._values)

    @property
    def value(self) -> float:
        if self._mean is None:
            self._mean = math.fsum(self._values) / len(self._values)
        return self._mean


def _pair_sums(n: int) -> tuple[int, int, int, int, int, int]:
    """Sums over k = 1..n of 1, k, k^2, (n-k), (n-k)^2, k*(n-k): closed forms, exact ints."""
    sum_k = n * (n + 1) // 2
    sum_k2 = n * (n + 1) * (2 * n + 1) // 6
    sum_r = n * (n - 1) // 2
    sum_r2 = (n - 1) * n * (2 * n - 1) // 6
    sum_kr = (n - 1) * n * (n + 1) // 6
    return n, sum_k, sum_k2, sum_r, sum_r2, sum_kr


class EtaEstimator:
    """eta = clamp(-Corr(k, N - k), 0, 1) over the turns of recently finished programs.

    Each finished program with N turns contributes the pairs (k, N - k), k = 1..N: k
    turns served, N - k still to come. eta is 1 when the turns served predict the turns
    left perfectly (fixed-length programs), about 0 when they say nothing (geometric
    turn counts). It stays 1.0 (assume the program returns) until ``min_programs``
    finished, and when every program in the window had one turn: the variances are
    then zero and the correlation is undefined.
    """

    def __init__(self, min_programs: int = 10, window: int = 1000) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.min_programs = min_programs
        self._turns: deque[int] = deque()
        self._window = window
        self._sums = [0] * 6
        self._value: float | None = None  # cached until the next finished program

    @property
    def count(self) -> int:
        return len(self._turns)

    def program_finished(self, total_turns: int) -> None:
        """Record a finished program; a program that served no turn is ignored."""
        if total_turns < 1:
            return
        if len(self._turns) == self._window:
            self._update(self._turns.popleft(), -1)
        self._turns.append(total_turns)
        self._update(total_turns, +1)
        self._value = None

    def _update(self, total_turns: int, sign: int) -> None:
        for i, s in enumerate(_pair_sums(total_turns)):
            self._sums[i] += sign * s

    @property
    def value(self) -> float:
        if self._value is None:
            self._value = self._correlation()
        return self._value

    def _correlation(self) -> float:
        if len(self._turns) < self.min_programs:
            return 1.0
        m, sum_k, sum_k2, sum_r, sum_r2, sum_kr = self._sums
        var_k = m * sum_k2 - sum_k * sum_k
        var_r = m * sum_r2 - sum_r * sum_r
        if var_k == 0 or var_r == 0:
            return 1.0
        corr = (m * sum_kr - sum_k * sum_r) / math.sqrt(var_k * var_r)
        return min(1.0, max(0.0, -corr))
