"""Measured against derived tier profiles (continuum_tiered/profiling/compare.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from continuum_tiered.core.profile import ProfileError, Tier, TierProfile, load_named_profile
from continuum_tiered.profiling.compare import Row, compare, format_table, main

DERIVED_8B = "h100-llama-3.1-8b"


def measured_8b() -> TierProfile:
    """The derived 8B profile with its figures changed as a measurement might."""
    derived = load_named_profile(DERIVED_8B)
    return dataclasses.replace(
        derived,
        tiers={
            "cpu": Tier("cpu", 32e9, 4e-5, write_bandwidth_bytes_per_s=16e9),
            "gpu-peer": Tier("gpu-peer", 400e9, 1e-5),  # a tier the derived one lacks
        },
        prefill_coeffs=tuple(2 * c for c in derived.prefill_coeffs),
        decode_coeffs=None,
        source="fixture",
    )


def rows_by_figure(rows: list[Row]) -> dict[str, Row]:
    return {row.figure: row for row in rows}


def test_rows_hold_measured_derived_and_their_ratio() -> None:
    rows = rows_by_figure(compare(measured_8b(), load_named_profile(DERIVED_8B)))
    cpu = rows["cpu load bandwidth"]
    assert (cpu.measured, cpu.derived, cpu.ratio) == (32, 64, 0.5)
    assert rows["cpu store bandwidth"].ratio == 0.25  # derived: as the load direction
    assert rows["cpu latency"].ratio == pytest.approx(2.0)
    for n in (1024, 4096, 16384):
        assert rows[f"prefill {n} tokens"].ratio == pytest.approx(2.0)
    # A tier on one side only, and decode not measured: no ratio, never a made-up one.
    assert rows["disk load bandwidth"].measured is None
    assert rows["gpu-peer load bandwidth"].derived is None
    assert rows["gpu-peer load bandwidth"].ratio is None
    assert rows["decode step batch 8 x 4096 tokens"].ratio is None
    assert rows["decode step batch 8 x 4096 tokens"].derived == pytest.approx(7.597, rel=1e-3)


def test_table_shows_dashes_where_a_figure_is_missing() -> None:
    table = format_table("t", compare(measured_8b(), load_named_profile(DERIVED_8B)))
    assert "| cpu load bandwidth | GB/s | 32 | 64 | 0.50 |" in table
    assert "| disk load bandwidth | GB/s | - | 2 | - |" in table
    assert table.startswith("### t\n")


def test_profiles_of_different_shapes_are_not_compared() -> None:
    with pytest.raises(ProfileError, match="shape"):
        compare(measured_8b(), load_named_profile("h100-llama-3.1-70b-tp4"))


def test_command_writes_the_tables_and_fails_on_a_missing_measurement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    measured = tmp_path / "llama-3.1-8b.json"
    measured_8b().save(measured)
    out = tmp_path / "comparison.md"
    argv = [str(measured), DERIVED_8B, str(tmp_path / "absent.json"), "h100-llama-3.1-70b-tp4"]
    assert main([*argv, "--out", str(out)]) == 1
    text = out.read_text()
    assert text == capsys.readouterr().out
    assert "| prefill 1024 tokens | ms |" in text
    assert "### absent.json / h100-llama-3.1-70b-tp4\n\nnot compared: cannot read" in text
    assert main([str(measured), DERIVED_8B]) == 0


def test_command_refuses_an_odd_argument_list_and_an_unknown_derived_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "m.json")])
    assert exc.value.code == 2 and "give pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "m.json"), "h100-no-such-model"])
    assert exc.value.code == 2 and "derived profile h100-no-such-model" in capsys.readouterr().err
