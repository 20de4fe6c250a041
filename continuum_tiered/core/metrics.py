"""Run summaries shared by the virtual-time replay and the real-time replay.

Kept free of vLLM imports so that a client-side replay can summarize without the engine.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ProgramOutcome:
    """What a summary needs of one completed program."""

    start_s: float
    end_s: float
    turns: int
    queue_s: float  # summed over the program's turns
    prompt_tokens: int
    hit_tokens: int

    @property
    def jct_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class RunSummary:
    policy: str
    jps: float
    programs: int
    avg_jct_s: float
    p50_jct_s: float
    p90_jct_s: float
    p95_jct_s: float
    throughput_programs_per_h: float
    avg_queue_s: float
    prefix_hit_ratio: float
    # Virtual time only: KV blocks held by requests and pins, averaged over the busy time.
    mean_kv_blocks: float | None = None
    # Virtual time, peers with LMCache tiers: blocks stored and dropped, disk write delays.
    stores: dict[str, float] | None = None
    pins_created: int | None = None  # virtual time, peers with pins

    def to_json(self) -> dict[str, object]:
        """The fields, with undefined statistics (no completed program) as null."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in asdict(self).items()
        }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = q * (len(ordered) - 1)
    lo = int(index)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (index - lo)


def summarize(policy: str, jps: float, outcomes: Sequence[ProgramOutcome]) -> RunSummary:
    """JCT statistics, throughput over the makespan, queueing per turn and prefix hits.

    With no outcome every statistic is NaN (``to_json`` writes null).
    """
    if not outcomes:
        nan = float("nan")
        return RunSummary(policy, jps, 0, nan, nan, nan, nan, nan, nan, nan)
    jcts = [o.jct_s for o in outcomes]
    makespan = max(o.end_s for o in outcomes) - min(o.start_s for o in outcomes)
    return RunSummary(
        policy=policy,
        jps=jps,
        programs=len(outcomes),
        avg_jct_s=statistics.fmean(jcts),
        p50_jct_s=quantile(jcts, 0.5),
        p90_jct_s=quantile(jcts, 0.9),
        p95_jct_s=quantile(jcts, 0.95),
        throughput_programs_per_h=3600 * len(outcomes) / makespan if makespan > 0 else math.inf,
        avg_queue_s=sum(o.queue_s for o in outcomes) / max(1, sum(o.turns for o in outcomes)),
        prefix_hit_ratio=sum(o.hit_tokens for o in outcomes)
        / max(1, sum(o.prompt_tokens for o in outcomes)),
    )


COLUMNS = (
    ("avg_jct_s", "avg JCT s"),
    ("p50_jct_s", "p50 s"),
    ("p90_jct_s", "p90 s"),
    ("p95_jct_s", "p95 s"),
    ("throughput_programs_per_h", "programs/h"),
    ("avg_queue_s", "queue s/turn"),
    ("prefix_hit_ratio", "prefix hit"),
)


def markdown_table(results: Sequence[RunSummary]) -> str:
    header = "| policy | jps | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|---|" + "---|" * len(COLUMNS)
    rows = [
        f"| {r.policy} | {r.jps:g} | "
        + " | ".join(_fmt(getattr(r, key)) for key, _ in COLUMNS)
        + " |"
        for r in results
    ]
    return "\n".join([header, rule, *rows])


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
