"""Where `tiered`'s gain comes from, against the strongest peers, and how it moves with hardware.

For each setting (continuum_tiered/sim/settings.py) at its saturating and heavier loads,
every system replays the same programs, arrivals, seed and profile in virtual time on
vLLM's real scheduler, with LMCache's stores, disk write queue and link sharing charged
(continuum_tiered/sim/tier_links.py):

- the component chain from ``vllm`` to ``tiered``, one mechanism at a time (program FCFS,
  CPU/disk tiers, layer-wise loads, cost-aware loads, pins), and each one's share of the
  gain over ``vllm``;
- the peers a user can run without us (``vllm+lmcache``, ``lmcache-layerwise+priority``,
  ``continuum``), and the bounds (``retention-bound``, ``oracle``);
- the checks of issue 13: ``tiered`` at least 1.10x lower average JCT than the best peer
  where the oracle leaves that much room, else within 2% of the retention bound; never
  worse than ``vllm``.

The sensitivity grid replays one setting at the last of ``--loads`` on each hardware variant
(CPU tier 100 GB / 1 TB, disk 2 / 7 / 25 GB/s, PCIe Gen5 / Gen4, H100 80 GB / H200 141 GB).

    python experiments/components.py [--settings swebench-8b,bfcl-8b,swebench-70b]
        [--loads saturation,heavier] [--sensitivity swebench-8b] [--programs-scale 0.5]
        [--seed 0] [--out out/components]

Writes report.md, results.json, components.png and sensitivity.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from continuum_tiered.core.metrics import RunSummary, markdown_table
from continuum_tiered.core.plots import pyplot
from continuum_tiered.lab.goals import OURS, RETENTION_BOUND
from continuum_tiered.sim.peers import COMPONENTS, get_peer
from continuum_tiered.sim.settings import HARDWARE, SETTINGS, Hardware, Setting
from continuum_tiered.sim.simulate import ReplaySetup, replay
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals
from continuum_tiered.traces.model import TraceProgram

CHAIN = [name for name, _ in COMPONENTS]
PEERS = (
    "vllm+lmcache",
    "lmcache-layerwise+priority",
    "vllm-offload",
    "continuum",
    "continuum-plugin",
)
BOUNDS = (RETENTION_BOUND, "oracle")
PINS = COMPONENTS[-1][0]  # tiered with its pins
SENSITIVITY_SYSTEMS = ("vllm", "lmcache-layerwise+priority", OURS, PINS)
ROOM = 1.10  # the gain over the best peer asked for where the oracle leaves that much room
BOUND_SLACK = 1.02  # elsewhere: within 2% of the retention bound
LOADS = {"light": 0, "saturation": 1, "heavier": 2}
MIN_GAIN = 0.01  # shares of a gain under 1% of vllm's JCT are not reported


def systems() -> list[str]:
    return list(dict.fromkeys([*CHAIN, *PEERS, *BOUNDS]))


def run_all(
    names: Sequence[str],
    programs: list[TraceProgram],
    setting: Setting,
    hardware: Hardware,
    jps: float,
    seed: int,
    out: Path,
    bar: tqdm,
) -> dict[str, RunSummary]:
    setup = ReplaySetup(hardware.deployment(setting), hardware.profile_ref(setting, out), seed)
    timed = with_poisson_arrivals(programs, jps, seed)
    results = {}
    for name in names:
        bar.set_postfix_str(f"{setting.name} {hardware.name} {name} @ {jps:g}")
        results[name], _ = replay(get_peer(name), timed, setup, jps, bar.update)
    return results


def component_shares(runs: dict[str, RunSummary]) -> list[tuple[str, float]]:
    """Each mechanism's share of ``vllm``'s average JCT less ``tiered``'s (negative: it
    made things worse than the system before it in the chain); NaN where the whole gain is
    under ``MIN_GAIN`` of ``vllm``'s JCT and shares would only magnify noise."""
    vllm = runs["vllm"].avg_jct_s
    total = vllm - runs[OURS].avg_jct_s
    shares = []
    for (before, _), (name, what) in itertools.pairwise(COMPONENTS):
        gain = runs[before].avg_jct_s - runs[name].avg_jct_s
        shares.append((what, gain / total if abs(total) >= MIN_GAIN * vllm else math.nan))
    return shares


def pins_share(runs: dict[str, RunSummary]) -> float:
    """What switching the pins on adds to ``tiered``, as a share of its gain over ``vllm``."""
    vllm, ours = runs["vllm"].avg_jct_s, runs[OURS].avg_jct_s
    if abs(vllm - ours) < MIN_GAIN * vllm:
        return math.nan
    return (ours - runs[PINS].avg_jct_s) / (vllm - ours)


def best_peer(runs: dict[str, RunSummary]) -> RunSummary:
    return min((runs[p] for p in PEERS), key=lambda r: r.avg_jct_s)


def checks(runs: dict[str, RunSummary]) -> list[str]:
    ours, peer, oracle = runs[OURS], best_peer(runs), runs["oracle"]
    bound = runs[RETENTION_BOUND]
    room = peer.avg_jct_s / oracle.avg_jct_s
    lines = []
    if room >= ROOM:
        ratio = peer.avg_jct_s / ours.avg_jct_s
        verdict = "pass" if round(ratio, 3) >= ROOM else "MISS"
        lines.append(
            f"{verdict}: best peer ({peer.policy}) / tiered = {ratio:.3f} (asked >= {ROOM}; "
            f"the oracle leaves {room:.3f})"
        )
    else:
        ratio = ours.avg_jct_s / bound.avg_jct_s
        verdict = "pass" if round(ratio, 3) <= BOUND_SLACK else "MISS"
        lines.append(
            f"{verdict}: tiered / retention bound = {ratio:.3f} (asked <= {BOUND_SLACK}; the "
            f"oracle leaves only {room:.3f} over the best peer, {peer.policy})"
        )
    vllm_ratio = ours.avg_jct_s / runs["vllm"].avg_jct_s
    lines.append(
        f"{'pass' if round(vllm_ratio, 3) <= 1 else 'MISS'}: tiered / vllm = {vllm_ratio:.3f}"
    )
    oracle_ratio = ours.avg_jct_s / oracle.avg_jct_s
    lines.append(
        f"{'pass' if round(oracle_ratio, 3) <= ROOM else 'MISS'}: tiered / oracle = "
        f"{oracle_ratio:.3f} (the retention bound: {bound.avg_jct_s / oracle.avg_jct_s:.3f})"
    )
    return lines


def store_table(runs: dict[str, RunSummary]) -> str:
    lines = [
        "| system | pins made | blocks stored | dropped | disk write delay mean s | max s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if name == RETENTION_BOUND or (r.stores is None and r.pins_created is None):
            continue
        pins = "" if r.pins_created is None else str(r.pins_created)
        s = r.stores
        stores = (
            "| | | | |"
            if s is None
            else f"| {s['blocks_stored']:.0f} | {s['blocks_dropped']:.0f} "
            f"| {s['disk_write_delay_mean_s']:.3f} | {s['disk_write_delay_max_s']:.3f} |"
        )
        lines.append(f"| {name} | {pins} {stores}")
    return "\n".join(lines)


def _percent(share: float) -> str:
    return "n/a" if math.isnan(share) else f"{share:+.1%}"


def section(setting: Setting, jps: float, programs: int, runs: dict[str, RunSummary]) -> str:
    shares = component_shares(runs)
    share_rows = "\n".join(f"| {what} | {_percent(share)} |" for what, share in shares)
    total = runs["vllm"].avg_jct_s / runs[OURS].avg_jct_s
    return "\n\n".join(
        [
            f"## {setting.name} at {jps:g} programs/s ({programs} programs, {setting.profile})",
            markdown_table(list(runs.values())),
            f"Share of the gain over `vllm` (vllm / tiered = {total:.3f}):\n\n"
            f"| mechanism | share |\n|---|---|\n{share_rows}",
            "Pins, and stores (LMCache's write-through and disk queue):\n\n" + store_table(runs),
            "\n".join(f"- {line}" for line in checks(runs)),
        ]
    )


def sensitivity_section(setting: Setting, jps: float, grid: dict[str, dict[str, RunSummary]]):
    head = " | ".join(SENSITIVITY_SYSTEMS)
    lines = [
        f"## Sensitivity: {setting.name} at {jps:g} programs/s, average JCT s",
        "",
        f"| hardware | {head} | lmcache-layerwise+priority / tiered | pins' share |",
        "|---|" + "---|" * (len(SENSITIVITY_SYSTEMS) + 2),
    ]
    for hw, runs in grid.items():
        cells = " | ".join(f"{runs[n].avg_jct_s:.1f}" for n in SENSITIVITY_SYSTEMS)
        peer = runs["lmcache-layerwise+priority"].avg_jct_s / runs[OURS].avg_jct_s
        lines.append(f"| {hw} | {cells} | {peer:.3f} | {_percent(pins_share(runs))} |")
    return "\n".join(lines)


def plot_components(results: dict[str, dict[str, RunSummary]], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(results)), 4.0))
    labels = list(results)
    bottoms = [0.0] * len(labels)
    for k, (_, what) in enumerate(COMPONENTS[1:]):
        heights = [component_shares(results[label])[k][1] for label in labels]
        ax.bar(labels, heights, bottom=bottoms, label=what, color=f"C{k}")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    ax.set_ylabel("share of the gain over vllm")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "components.png", dpi=120)
    plt.close(fig)


def plot_sensitivity(grid: dict[str, dict[str, RunSummary]], out: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    hws = list(grid)
    width = 0.8 / len(SENSITIVITY_SYSTEMS)
    for k, name in enumerate(SENSITIVITY_SYSTEMS):
        xs = [i + (k - len(SENSITIVITY_SYSTEMS) / 2 + 0.5) * width for i in range(len(hws))]
        ax.bar(xs, [grid[h][name].avg_jct_s for h in hws], width, label=name)
    ax.set_xticks(range(len(hws)), hws, rotation=20, fontsize=7)
    ax.set_ylabel("average JCT (s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    plt.close(fig)


def _names(value: str, known: dict, what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="swebench-8b,bfcl-8b,swebench-70b")
    p.add_argument(
        "--loads", default="saturation,heavier", help="of each setting: light, saturation, heavier"
    )
    p.add_argument("--sensitivity", default="swebench-8b", help="a setting, or '' for none")
    p.add_argument("--hardware", default=",".join(HARDWARE), help="the sensitivity variants")
    p.add_argument("--programs-scale", type=float, default=0.5, help="fewer programs: < 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/components"))
    args = p.parse_args(argv)
    settings = [SETTINGS[n] for n in _names(args.settings, SETTINGS, "setting", p)]
    sensitivity = [SETTINGS[n] for n in _names(args.sensitivity, SETTINGS, "setting", p)]
    hardware = [HARDWARE[n] for n in _names(args.hardware, HARDWARE, "hardware", p)]
    load_names = _names(args.loads, LOADS, "load", p)
    if not 0 < args.programs_scale <= 1:
        p.error(f"--programs-scale must be in (0, 1], got {args.programs_scale}")
    base = HARDWARE["h100-base"]
    traces = {
        s.name: load_named_trace(
            s.trace, programs=max(2, round(s.programs * args.programs_scale)), seed=args.seed
        )
        for s in {*settings, *sensitivity}
    }
    # A bound runs every queue order but reports progress once.
    total = sum(len(load_names) * len(systems()) * len(traces[s.name]) for s in settings) + sum(
        len(hardware) * len(SENSITIVITY_SYSTEMS) * len(traces[s.name]) for s in sensitivity
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, RunSummary]] = {}
    grids: dict[str, dict[str, dict[str, RunSummary]]] = {}
    sections = []
    with tqdm(total=total, unit="program", desc="components") as bar:
        for s in settings:
            for jps in (s.loads[LOADS[name]] for name in load_names):
                runs = run_all(
                    systems(), traces[s.name], s, base, jps, args.seed, args.out / "profiles", bar
                )
                results[f"{s.name}@{jps:g}"] = runs
                sections.append(section(s, jps, len(traces[s.name]), runs))
        for s in sensitivity:
            jps = s.loads[LOADS[load_names[-1]]]
            grids[s.name] = {
                hw.name: run_all(
                    SENSITIVITY_SYSTEMS,
                    traces[s.name],
                    s,
                    hw,
                    jps,
                    args.seed,
                    args.out / "profiles",
                    bar,
                )
                for hw in hardware
            }
            sections.append(sensitivity_section(s, jps, grids[s.name]))
    command = " ".join(["python experiments/components.py", *(argv or sys.argv[1:])])
    header = f"# Where the gain comes from\n\nCommand: `{command}`"
    (args.out / "report.md").write_text("\n\n".join([header, *sections]) + "\n")
    records = {
        "settings": {k: {n: r.to_json() for n, r in v.items()} for k, v in results.items()},
        "sensitivity": {
            s: {hw: {n: r.to_json() for n, r in runs.items()} for hw, runs in grid.items()}
            for s, grid in grids.items()
        },
    }
    (args.out / "results.json").write_text(json.dumps(records, indent=2))
    if results:
        plot_components(results, args.out)
    if grids:
        plot_sensitivity(next(iter(grids.values())), args.out)
    print("\n\n".join(sections))
    print(f"\nwrote {args.out}/report.md")
    return 0
