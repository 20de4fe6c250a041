"""Empirical distributions of tool durations, measured server side.

A duration is (arrival of turn i+1) - (finish of turn i) of one program. Each tool and
the union of all tools keep a sliding window of recent samples: memory stays bounded
and the distribution follows drift.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from functools import cached_property
from typing import Literal

import numpy as np


class EmpiricalCDF:
    """The empirical CDF of a non-empty, ascending sequence of non-negative durations."""

    def __init__(self, sorted_samples: Sequence[float], *, trusted: bool = False) -> None:
        """``trusted`` skips the O(n) checks for samples a ``_Window`` kept sorted."""
        samples = tuple(sorted_samples)
        if not samples:
            raise ValueError("an empirical CDF needs at least one sample")
        if not trusted and (samples[0] < 0 or any(a > b for a, b in itertools.pairwise(samples))):
            raise ValueError("samples must be non-negative and sorted ascending")
        self.samples = samples

    @cached_property
    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct sample values and P(tau) at each, as arrays, so that ``best_ttl``
        is one vectorised pass (the CDF is a snapshot: computed once, used per turn)."""
        values = np.asarray(self.samples, dtype=np.float64)
        last_of_run = np.append(values[1:] != values[:-1], True)
        (ends,) = np.nonzero(last_of_run)
        return values[last_of_run], (ends + 1) / len(values)

    def __len__(self) -> int:
        return len(self.samples)

    def min(self) -> float:
        return self.samples[0]

    def prob_le(self, t: float) -> float:
        """Fraction of samples <= t."""
        return bisect.bisect_right(self.samples, t) / len(self.samples)

    def candidates(self) -> list[float]:
        """The TTLs worth considering: 0 and every distinct sample, ascending."""
        out = [0.0]
        for x in self.samples:
            if x > out[-1]:
                out.append(x)
        return out


class _Window:
    """The most recent ``size`` samples, also kept sorted."""

    def __init__(self, size: int) -> None:
        self._recent: deque[float] = deque()
        self._size = size
        self.sorted: list[float] = []
        self._snapshot: EmpiricalCDF | None = None
        self._stale = 0

    def snapshot(self) -> EmpiricalCDF:
        """The window's CDF, rebuilt once 1/16 of the window is new since the last one.

        Rebuilding costs O(n); a CDF of a thousand samples does not move with a handful
        of new ones, and decisions come once per finished turn.
        """
        if self._snapshot is None or self._stale >= max(1, len(self.sorted) // 16):
            self._snapshot = EmpiricalCDF(self.sorted, trusted=True)
            self._stale = 0
        return self._snapshot

    def __len__(self) -> int:
        return len(self.sorted)

    def add(self, x: float) -> None:
        if len(self._recent) == self._size:
            oldest = self._recent.popleft()
            del self.sorted[bisect.bisect_left(self.sorted, oldest)]
        self._recent.append(x)
        bisect.insort(self.sorted, x)
        self._stale += 1


class ToolDurationModel:
    """Per-tool and global duration windows, with Continuum's cold-start rule.

    No distribution until ``min_samples`` durations were seen in total; then a tool's own
    window once it holds ``min_samples``, the global window before that. Only the first
    ``max_tools`` tool names get their own window; the others feed the global one.
    """

    def __init__(self, min_samples: int = 100, window: int = 1024, max_tools: int = 256) -> None:
        if not 1 <= min_samples <= window:
            raise ValueError(f"need 1 <= min_samples <= window, got {min_samples}, {window}")
        self.min_samples = min_samples
        self.window = window
        self.max_tools = max_tools
        self._global = _Window(window)
        self._tools: dict[str, _Window] = {}
        self._total = 0

    @property
    def total_samples(self) -> int:
        """Durations accepted since creation (not capped by the window)."""
        return self._total

    def observe(self, tool: str | None, duration_s: float) -> None:
        if not math.isfinite(duration_s) or duration_s < 0:
            return
        self._total += 1
        self._global.add(duration_s)
        if tool is None:
            return
        per_tool = self._tools.get(tool)
        if per_tool is None:
            if len(self._tools) >= self.max_tools:
                return
            per_tool = self._tools[tool] = _Window(self.window)
        per_tool.add(duration_s)

    def select(self, tool: str | None) -> tuple[EmpiricalCDF, Literal["tool", "global"]] | None:
        """The distribution to use for ``tool`` and which one it is; None in cold start."""
        if self._total < self.min_samples:
            return None
        per_tool = self._tools.get(tool) if tool is not None else None
        if per_tool is not None and len(per_tool) >= self.min_samples:
            return per_tool.snapshot(), "tool"
        return self._global.snapshot(), "global"

    def distribution(self, tool: str | None) -> EmpiricalCDF | None:
        selected = self.select(tool)
        return None if selected is None else selected[0]
