"""The report of a live-server experiment: ``report.md``, ``results.json`` and two plots.

Ratios compare each system with vanilla vLLM run by run (run k of a system against run k
of vLLM, which ran in the same round) and report the median over the runs: a single
slow run of a shared machine then moves the result little.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.core.metrics import markdown_table
from continuum_tiered.core.plots import plot_jct_cdf, pyplot
from continuum_tiered.lab.experiment import Results, SystemRun

BASELINE = "vllm"


@dataclass(frozen=True)
class Ratios:
    """Medians over the runs of a system's ratios to vanilla vLLM; above 1 is better."""

    system: str
    avg_jct_speedup: float  # vLLM's average JCT / the system's
    p95_jct_speedup: float
    throughput_gain: float  # the system's programs per hour / vLLM's


def _ratio_of(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _median_ratio(pairs: Sequence[tuple[float, float]]) -> float:
    ratios = [r for a, b in pairs if not math.isnan(r := _ratio_of(a, b))]
    return statistics.median(ratios) if ratios else math.nan


def ratios_to_baseline(results: Results, baseline: str = BASELINE) -> list[Ratios]:
    base = results.runs.get(baseline)
    if not base:
        return []
    rows = []
    for name, runs in results.runs.items():
        pairs = list(zip(base, runs, strict=True))
        rows.append(
            Ratios(
                name,
                _median_ratio([(b.summary.avg_jct_s, r.summary.avg_jct_s) for b, r in pairs]),
                _median_ratio([(b.summary.p95_jct_s, r.summary.p95_jct_s) for b, r in pairs]),
                _median_ratio(
                    [
                        (r.summary.throughput_programs_per_h, b.summary.throughput_programs_per_h)
                        for b, r in pairs
                    ]
                ),
            )
        )
    return rows


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def ratio_table(rows: Sequence[Ratios], repeats: int) -> str:
    lines = [
        "| system | avg JCT speedup | p95 JCT speedup | throughput gain | runs |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.system} | {_ratio(r.avg_jct_speedup)} | {_ratio(r.p95_jct_speedup)} | "
        f"{_ratio(r.throughput_gain)} | {repeats} |"
        for r in rows
    ]
    return "\n".join(lines)


def per_run_table(results: Results, baseline: str = BASELINE) -> str:
    """Each run's average-JCT speedup over the baseline's run of the same round, with the
    1-minute load average at the start and end of the system's run."""
    base = results.runs.get(baseline, [])
    repeats = len(base)
    lines = [
        "| system | " + " | ".join(f"run {k}" for k in range(1, repeats + 1)) + " |",
        "|---" * (repeats + 1) + "|",
    ]
    for name, runs in results.runs.items():
        cells = [
            f"{_ratio(_ratio_of(b.summary.avg_jct_s, r.summary.avg_jct_s))} "
            f"(load {r.load[0]:.1f}-{r.load[1]:.1f})"
            for b, r in zip(base, runs, strict=True)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _all_runs(results: Results) -> list[SystemRun]:
    return [run for runs in results.runs.values() for run in runs]


def run_table(results: Results) -> str:
    """Every run's summary; with repeats each row names its run."""
    repeats = max((len(runs) for runs in results.runs.values()), default=1)
    summaries = [
        dataclasses.replace(r.summary, policy=f"{r.system} (run {r.repeat})")
        if repeats > 1
        else r.summary
        for r in _all_runs(results)
    ]
    return markdown_table(summaries)


def plot_avg_jct(results: Results, path: Path) -> None:
    """Median average JCT per system, with the runs' range as error bars."""
    plt = pyplot()
    names = list(results.runs)
    values = [[r.summary.avg_jct_s for r in results.runs[n]] for n in names]
    medians = [statistics.median(v) for v in values]
    errors = [
        [m - min(v) for m, v in zip(medians, values, strict=True)],
        [max(v) - m for m, v in zip(medians, values, strict=True)],
    ]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(names)), 3.8))
    ax.bar(names, medians, yerr=errors, capsize=4)
    ax.set_ylabel("average job completion time (s)")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: Results, out_dir: Path, title: str, setup: Mapping[str, str]) -> Path:
    """``report.md`` (setup, tables, server commands), ``results.json``,
    ``jct_cdf.png`` (every run's programs pooled per system) and ``avg_jct.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    repeats = max((len(runs) for runs in results.runs.values()), default=0)
    jcts = {
        name: [p.jct_s for run in runs for p in run.records if p.error is None]
        for name, runs in results.runs.items()
    }
    plot_jct_cdf({"job completion times, all runs": jcts}, out_dir / "jct_cdf.png")
    plot_avg_jct(results, out_dir / "avg_jct.png")
    lines = [f"# {title}", "", "## Setup", ""]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += ["", "## Runs", "", run_table(results), ""]
    failed = [f"- {r.system} (run {r.repeat}): {r.failed}" for r in _all_runs(results) if r.failed]
    if failed:
        lines += ["Failed programs (left out of the statistics):", "", *failed, ""]
    if ratios := ratios_to_baseline(results):
        lines += [
            f"## Ratios to {BASELINE}",
            "",
            f"Median over {repeats} run(s) of the per-run ratio; above 1 is better.",
            "",
            ratio_table(ratios, repeats),
            "",
            "Per run: average-JCT speedup (1-minute load average at the start and end of the "
            "system's run, on the machine's CPUs).",
            "",
            per_run_table(results),
            "",
        ]
    lines += ["![JCT CDF](jct_cdf.png) ![average JCT](avg_jct.png)", ""]
    counters = [
        f"- {r.system} (run {r.repeat}): " + ", ".join(f"{k}={v:g}" for k, v in r.counters.items())
        for r in _all_runs(results)
        if r.counters
    ]
    if counters:
        lines += ["## Connector counters", "", *counters, ""]
    lines += ["## Server commands", ""]
    lines += [f"- {n}: `{' '.join(runs[0].command)}`" for n, runs in results.runs.items()]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "setup": dict(setup),
                "runs": {n: [r.to_json() for r in runs] for n, runs in results.runs.items()},
            },
            indent=2,
        )
    )
    return report
