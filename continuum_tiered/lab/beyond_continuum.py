"""Beyond Continuum: our default with tiers, ``tiered``, against ``oracle`` and ``vllm``.

For SWE-bench and BFCL, on the Llama-3.1-8B (one H100) and Llama-3.1-70B (four H100s,
tensor parallel) profiles, at three loads each, every policy runs in
virtual time on the same programs, arrivals, seed and profile. Robustness: at each
setting's middle load, the same programs with every tool 10x slower after half the
programs, and with a bimodal tool (90% under 1 s, 10% around 60 s). Beside the oracle
(GPU memory for every program), ``retention-bound`` keeps every program's KV at no cost
but admits requests into the real GPU pool: what no retention policy can beat, so where
``tiered`` misses the oracle target, the report tells a policy gap from a memory one.

The loads come from a sweep of ``vllm`` alone (seed 0, same programs): light, where
``vllm`` does not queue; saturation, the first load of the sweep where its average JCT
reaches 1.5x the light one (SWE-bench 8B: 206 s at 0.1, 521 s at 0.15; BFCL 8B: 15 s at
3, 127 s at 3.5; SWE-bench 70B: 245 s at 0.05, 1097 s at 0.1; BFCL 70B: 22 s at 1.25,
447 s at 1.5); heavier, twice the saturation load.

    python experiments/beyond_continuum.py [--settings swebench-8b,bfcl-8b,...]
        [--programs-scale 1.0] [--seed 0] [--out out/beyond_continuum]

Writes report.md (tables, the checks of continuum_tiered/lab/goals.py), results.json,
jct_vs_load.png and ratio_to_oracle.png.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.metrics import RunSummary, markdown_table
from continuum_tiered.core.plots import pyplot
from continuum_tiered.lab.goals import (
    OURS,
    RETENTION_BOUND,
    Check,
    robustness_check,
    setting_checks,
)
from continuum_tiered.sim.peers import get_peer
from continuum_tiered.sim.settings import SETTINGS, Setting
from continuum_tiered.sim.simulate import ReplaySetup, replay
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.traces.shifts import bimodal_tools, slow_tools_after

POLICIES = ("vllm", "vllm+lmcache", "continuum", OURS, RETENTION_BOUND, "oracle")
ROBUSTNESS_POLICIES = ("vllm+lmcache", "continuum", OURS)
SHIFTS: dict[str, Callable[[list[TraceProgram], int], list[TraceProgram]]] = {
    "tools 10x slower after half": lambda programs, seed: slow_tools_after(programs),
    "bimodal tool": bimodal_tools,
}


def run_setting(
    setting: Setting, programs: list[TraceProgram], seed: int, bar: tqdm
) -> tuple[list[RunSummary], dict[str, list[RunSummary]]]:
    setup = ReplaySetup(Deployment(model=setting.model), setting.profile, seed)

    def run(policy: str, timed: list[TraceProgram], jps: float, label: str) -> RunSummary:
        bar.set_postfix_str(f"{setting.name} {label}{policy} @ {jps:g}")
        summary, _ = replay(get_peer(policy), timed, setup, jps, bar.update)
        return summary

    runs = []
    for jps in setting.loads:
        timed = with_poisson_arrivals(programs, jps, seed)
        runs += [run(policy, timed, jps, "") for policy in POLICIES]
    middle = setting.loads[1]
    timed = with_poisson_arrivals(programs, middle, seed)
    robustness = {
        name: [run(p, shift(timed, seed), middle, f"{name}: ") for p in ROBUSTNESS_POLICIES]
        for name, shift in SHIFTS.items()
    }
    return runs, robustness


def ratio_table(runs: Sequence[RunSummary], gpu_blocks: int) -> str:
    """Ours over each reference, per load: lower is better. The last two columns say what
    retention alone can reach: the retention bound (every KV kept at no cost, in the real
    GPU pool) over the oracle, and the oracle's KV in use over the GPU pool. Above 1, what
    the oracle runs at once does not fit on the GPU, so any real policy queues where the
    oracle does not."""
    lines = [
        "| load (jps) | avg / oracle | avg / continuum | p95 / continuum | avg / vllm "
        "| retention bound / oracle | oracle's KV / GPU pool |",
        "|---|---|---|---|---|---|---|",
    ]
    for jps in sorted({r.jps for r in runs}):
        at = {r.policy: r for r in runs if r.jps == jps}
        ours = at[OURS]
        lines.append(
            f"| {jps:g} | {ours.avg_jct_s / at['oracle'].avg_jct_s:.3f} "
            f"| {ours.avg_jct_s / at['continuum'].avg_jct_s:.3f} "
            f"| {ours.p95_jct_s / at['continuum'].p95_jct_s:.3f} "
            f"| {ours.avg_jct_s / at['vllm'].avg_jct_s:.3f} "
            f"| {at[RETENTION_BOUND].avg_jct_s / at['oracle'].avg_jct_s:.3f} "
            f"| {(at['oracle'].mean_kv_blocks or 0.0) / gpu_blocks:.2f} |"
        )
    return "\n".join(lines)


def report_section(
    setting: Setting,
    programs: int,
    runs: list[RunSummary],
    robustness: dict[str, list[RunSummary]],
) -> tuple[str, list[Check]]:
    checks = setting_checks(runs) + [
        robustness_check(name, shifted) for name, shifted in robustness.items()
    ]
    parts = [
        f"## {setting.name}: {setting.trace}, {programs} programs, profile {setting.profile}",
        markdown_table(runs),
        "Ratios of `tiered`:",
        ratio_table(runs, Deployment(model=setting.model).num_gpu_blocks()),
    ]
    for name, shifted in robustness.items():
        parts += [f"Robustness, {name}, at {setting.loads[1]:g} jps:", markdown_table(shifted)]
    parts.append("\n".join(f"- {c.line()}" for c in checks))
    return "\n\n".join(parts), checks


def plot(results: dict[Setting, list[RunSummary]], out: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, (setting, runs) in zip(axes[0], results.items(), strict=True):
        for policy in POLICIES:
            points = sorted((r.jps, r.avg_jct_s) for r in runs if r.policy == policy)
            ax.plot(*zip(*points, strict=True), marker="o", label=policy)
        ax.set_title(setting.name)
        ax.set_xlabel("load (programs per second)")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("average JCT (s)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(out / "jct_vs_load.png", dpi=120)
    plt.close(fig)

    # One colour per setting, one line style per policy.
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for color, (setting, runs) in enumerate(results.items()):
        oracle = {r.jps: r.avg_jct_s for r in runs if r.policy == "oracle"}
        for policy, style in ((OURS, "-o"), (RETENTION_BOUND, "--^"), ("continuum", ":x")):
            ratios = [r.avg_jct_s / oracle[r.jps] for r in runs if r.policy == policy]
            ax.plot(range(1, 4), ratios, style, color=f"C{color}", label=f"{setting.name} {policy}")
    ax.axhline(1.10, color="grey", linestyle="-", linewidth=0.8, label="1.10x oracle")
    ax.set_xticks([1, 2, 3], ["light", "saturation", "heavier"])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_yticks([0.7, 1.0, 1.1, 1.5, 2, 3, 5])
    ax.set_ylabel("average JCT / oracle")
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ratio_to_oracle.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"from {', '.join(SETTINGS)}")
    p.add_argument("--programs-scale", type=float, default=1.0, help="fewer programs: < 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/beyond_continuum"))
    args = p.parse_args(argv)
    names = [n.strip() for n in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    if not 0 < args.programs_scale <= 1:
        p.error(f"--programs-scale must be in (0, 1], got {args.programs_scale}")

    settings = [SETTINGS[n] for n in names]
    traces = {
        s.name: load_named_trace(
            s.trace, programs=max(2, round(s.programs * args.programs_scale)), seed=args.seed
        )
        for s in settings
    }
    runs_per_program = 3 * len(POLICIES) + len(SHIFTS) * len(ROBUSTNESS_POLICIES)
    total = sum(len(traces[s.name]) * runs_per_program for s in settings)
    results: dict[Setting, list[RunSummary]] = {}
    sections, checks, records = [], [], []
    with tqdm(total=total, unit="program", desc="beyond_continuum") as bar:
        for setting in settings:
            runs, robustness = run_setting(setting, traces[setting.name], args.seed, bar)
            results[setting] = runs
            programs = len(traces[setting.name])
            section, setting_checks_ = report_section(setting, programs, runs, robustness)
            sections.append(section)
            checks += setting_checks_
            records.append(
                {
                    "setting": setting.name,
                    "trace": setting.trace,
                    "profile": setting.profile,
                    "programs": programs,
                    "seed": args.seed,
                    "runs": [r.to_json() for r in runs],
                    "robustness": {k: [r.to_json() for r in v] for k, v in robustness.items()},
                    "checks": [
                        {"name": c.name, "jps": c.jps, "ratio": c.ratio, "limit": c.limit}
                        for c in setting_checks_
                    ],
                }
            )
    args.out.mkdir(parents=True, exist_ok=True)
    passed = sum(c.passed for c in checks)
    header = (
        "# Beyond Continuum: `tiered` in virtual time\n\n"
        f"{passed} of {len(checks)} checks pass. Command: `python experiments/"
        f"beyond_continuum.py --settings {','.join(names)} --programs-scale "
        f"{args.programs_scale:g} --seed {args.seed}`"
    )
    (args.out / "report.md").write_text("\n\n".join([header, *sections]) + "\n")
    (args.out / "results.json").write_text(json.dumps(records, indent=2))
    plot(results, args.out)
    print("\n".join(c.line() for c in checks))
    print(f"\n{passed} of {len(checks)} checks pass; wrote {args.out}/report.md")
    return 0
