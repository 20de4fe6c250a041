"""Measured against derived tier profiles: one row per figure the replay and the TTL use.

For each pair (a profile measured by ``continuum-tiered profile``, and the built-in one it
checks, e.g. ``h100-llama-3.1-8b`` derived from published kernel tables), a Markdown table
with measured, derived and measured / derived for each tier's bandwidths and latency, the
prefill time at a few prompt lengths and the decode step time at a few (batch, context)
points. Pure Python on the profile files: no torch, no vLLM.

    python -m continuum_tiered.profiling.compare MEASURED.json DERIVED [MEASURED DERIVED ...]
        [--out TABLE.md]

DERIVED is a built-in profile name or a profile file. Exit status 1 when a measured profile
is missing or unreadable (its table says why), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.core.profile import ProfileError, Tier, TierProfile, load_named_profile

PREFILL_POINTS = (1024, 4096, 16384)  # prompt tokens
DECODE_POINTS = ((1, 1024), (8, 4096), (32, 16384))  # (batch, context tokens)
GB = 1e9


@dataclass(frozen=True)
class Row:
    figure: str
    unit: str
    measured: float | None
    derived: float | None

    @property
    def ratio(self) -> float | None:
        if self.measured is None or self.derived is None or self.derived == 0:
            return None
        return self.measured / self.derived


def compare(
    measured: TierProfile,
    derived: TierProfile,
    prefill_points: Sequence[int] = PREFILL_POINTS,
    decode_points: Sequence[tuple[int, int]] = DECODE_POINTS,
) -> list[Row]:
    """The rows for one pair; ProfileError when they describe different model shapes (a
    per-token or per-layer figure of one says nothing about the other)."""
    if measured.model.shape != derived.model.shape:
        raise ProfileError(
            f"measured profile is for shape {measured.model.shape_text()}, derived one "
            f"({derived.model.name}) for {derived.model.shape_text()}"
        )
    rows = []
    for name in sorted(set(measured.tiers) | set(derived.tiers)):
        rows += _tier_rows(name, measured.tiers.get(name), derived.tiers.get(name))
    rows += [
        Row(
            f"prefill {n} tokens",
            "ms",
            measured.prefill_time(n) * 1e3,
            derived.prefill_time(n) * 1e3,
        )
        for n in prefill_points
    ]
    rows += [
        Row(
            f"decode step batch {b} x {c} tokens",
            "ms",
            _decode_ms(measured, b, c),
            _decode_ms(derived, b, c),
        )
        for b, c in decode_points
    ]
    return rows


def format_table(title: str, rows: Sequence[Row]) -> str:
    lines = [
        f"### {title}",
        "",
        "| figure | unit | measured | derived | measured / derived |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        cells = (_num(row.measured), _num(row.derived), _ratio(row.ratio))
        lines.append(f"| {row.figure} | {row.unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_files(measured_path: Path, derived_name: str) -> tuple[str, bool]:
    """The table for one pair, and whether it could be made. A derived profile that does not
    load is a caller's error (ProfileError); a missing or bad measured one is reported in
    the text, since the measurement that should have written it may have failed."""
    derived = load_named_profile(derived_name)
    title = f"{measured_path.name} / {derived_name}"
    try:
        measured = TierProfile.load(measured_path, expect_model=derived.model)
    except ProfileError as exc:
        return f"### {title}\n\nnot compared: {exc}\n", False
    return format_table(title, compare(measured, derived)), True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m continuum_tiered.profiling.compare",
        description="Compare measured tier profiles with derived (built-in) ones.",
    )
    parser.add_argument("pairs", nargs="+", metavar="MEASURED DERIVED")
    parser.add_argument("--out", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give pairs: MEASURED.json DERIVED (a built-in profile name or a file)")
    tables, ok = [], True
    for measured, derived in zip(args.pairs[::2], args.pairs[1::2], strict=True):
        try:
            table, made = compare_files(Path(measured), derived)
        except ProfileError as exc:
            parser.error(f"derived profile {derived}: {exc}")
        tables.append(table)
        ok &= made
    text = "\n".join(tables)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0 if ok else 1


def _tier_rows(name: str, measured: Tier | None, derived: Tier | None) -> list[Row]:
    """A tier only one profile has gets "-" on the other side."""
    figures = {
        "load bandwidth": ("GB/s", lambda t: t.bandwidth_bytes_per_s / GB),
        "store bandwidth": ("GB/s", lambda t: t.write_bandwidth / GB),
        "latency": ("us", lambda t: t.latency_s * 1e6),
    }
    return [
        Row(
            f"{name} {figure}",
            unit,
            None if measured is None else get(measured),
            None if derived is None else get(derived),
        )
        for figure, (unit, get) in figures.items()
    ]


def _decode_ms(profile: TierProfile, batch: int, context: int) -> float | None:
    if profile.decode_coeffs is None:
        return None
    return profile.decode_step_time(batch, context) * 1e3


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main())
