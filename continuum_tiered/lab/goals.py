"""The targets of ``tiered``, our default with tiers (issue 7), checked on one setting's runs.

A setting is one trace on one deployment at three loads (light, where ``vllm`` starts to
saturate, heavier), every run with the same programs, seed and profile. Each check names
what it compares and by how much, so a report can print it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from continuum_tiered.core.metrics import RunSummary

OURS = "tiered"
RETENTION_BOUND = "retention-bound"  # every KV kept at no cost, in the real GPU pool
ORACLE_SLACK = 1.10  # avg JCT at most 1.10x the oracle's
CONTINUUM_GAIN = 0.90  # at the two heavier loads, avg JCT at most 0.90x Continuum's
ROBUST_SLACK = 1.02  # shifted tools: at most 2% worse than the better baseline


@dataclass(frozen=True)
class Check:
    name: str
    jps: float
    ratio: float  # ours over the reference: lower is better
    limit: float
    bound: float | None = None  # the retention bound over the same reference, where run

    @property
    def passed(self) -> bool:
        """Judged at the three decimals the report prints: equal runs tie, not fail."""
        return round(self.ratio, 3) <= self.limit

    def line(self) -> str:
        verdict = "pass" if self.passed else "MISS"
        line = f"{verdict}: {self.name} at {self.jps:g} jps: {self.ratio:.3f} (limit {self.limit})"
        if self.bound is not None:
            line += f"; the retention bound: {self.bound:.3f}"
        return line


def _by_policy(runs: Sequence[RunSummary], jps: float) -> dict[str, RunSummary]:
    return {r.policy: r for r in runs if r.jps == jps}


def setting_checks(runs: Sequence[RunSummary]) -> list[Check]:
    """Oracle, Continuum and vLLM comparisons at each load of one setting."""
    loads = sorted({r.jps for r in runs})
    checks: list[Check] = []
    for i, jps in enumerate(loads):
        at = _by_policy(runs, jps)
        ours, oracle = at[OURS], at["oracle"].avg_jct_s
        bound = at.get(RETENTION_BOUND)
        checks.append(
            Check(
                "avg JCT / oracle",
                jps,
                ours.avg_jct_s / oracle,
                ORACLE_SLACK,
                None if bound is None else bound.avg_jct_s / oracle,
            )
        )
        if i >= len(loads) - 2:
            continuum = at["continuum"]
            checks += [
                Check(
                    "avg JCT / continuum", jps, ours.avg_jct_s / continuum.avg_jct_s, CONTINUUM_GAIN
                ),
                Check("p95 JCT / continuum", jps, ours.p95_jct_s / continuum.p95_jct_s, 1.0),
            ]
        vllm = at["vllm"]
        checks += [
            Check("avg JCT / vllm", jps, ours.avg_jct_s / vllm.avg_jct_s, 1.0),
            Check(
                "vllm throughput / ours",
                jps,
                vllm.throughput_programs_per_h / ours.throughput_programs_per_h,
                1.0,
            ),
        ]
    return checks


def robustness_check(name: str, runs: Sequence[RunSummary]) -> Check:
    """Ours against the better of ``vllm+lmcache`` and ``continuum`` on shifted tools."""
    (jps,) = {r.jps for r in runs}
    at = _by_policy(runs, jps)
    best = min(at["vllm+lmcache"].avg_jct_s, at["continuum"].avg_jct_s)
    return Check(f"{name}: avg JCT / best baseline", jps, at[OURS].avg_jct_s / best, ROBUST_SLACK)
