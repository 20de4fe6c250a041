"""The H100 profiles' tiers, host figure and provenance, which need no wheel to redo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from continuum_tiered.core.profile import BUILTIN_DIR, TierProfile
from continuum_tiered.profiling.published import PCIE_DUPLEX_SHARE, h100_profile

MODELS = {"llama-3.1-8b": 1, "llama-3.1-70b-tp4": 4}
SCRIPT = Path(__file__).parents[1] / "experiments" / "derive_h100_profiles.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("derive_h100_profiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed(model: str) -> TierProfile:
    return TierProfile.load(BUILTIN_DIR / f"h100-{model}.json")


@pytest.mark.parametrize(("model", "tp"), MODELS.items())
def test_committed_profiles_are_what_the_derivation_writes(model: str, tp: int) -> None:
    committed = _committed(model)
    pcie = committed.tiers["cpu"].bandwidth_bytes_per_s
    assert committed.decode_coeffs is not None
    derived = h100_profile(model, tp, committed.prefill_coeffs, committed.decode_coeffs, pcie)
    assert derived == committed


@pytest.mark.parametrize(("model", "tp"), MODELS.items())
def test_tiers_only_keeps_the_kernel_fits_of_a_file_from_before_provenance(
    tmp_path: Path, model: str, tp: int
) -> None:
    """A file as the wheel derivation wrote it before issue 13 (no write, duplex, host
    figure or provenance) comes out as the committed one, kernel fits byte for byte."""
    data = _committed(model).to_json()
    for key in ("host_memcpy_bytes_per_s", "provenance"):
        del data[key]
    for tier in data["tiers"].values():
        del tier["write_bandwidth_bytes_per_s"], tier["duplex_bandwidth_bytes_per_s"]
    old = tmp_path / f"h100-{model}.json"
    old.write_text(json.dumps(data))
    redone = _script().retiered(old, model, tp)
    assert redone == _committed(model)
    for key in ("prefill_coeffs", "decode_coeffs"):
        assert json.dumps(redone.to_json()[key]) == json.dumps(data[key])


def test_h100_figures_and_their_provenance() -> None:
    profile = _committed("llama-3.1-8b")
    cpu, disk = profile.tiers["cpu"], profile.tiers["disk"]
    assert cpu.write_bandwidth == cpu.bandwidth_bytes_per_s == 64e9  # per direction
    assert cpu.duplex_bandwidth == PCIE_DUPLEX_SHARE * 64e9
    assert (disk.bandwidth_bytes_per_s, disk.write_bandwidth, disk.duplex_bandwidth) == (
        2e9,
        1.5e9,
        1e9,
    )
    assert profile.host_memcpy_bytes_per_s == 10e9
    by_kind: dict[str, set[str]] = {}
    for path, kind in profile.provenance.items():
        by_kind.setdefault(kind, set()).add(path)
    assert by_kind["derived"] == {"prefill_coeffs", "decode_coeffs"}
    assert by_kind["published"] == {
        "tiers.cpu.bandwidth_bytes_per_s",
        "tiers.cpu.write_bandwidth_bytes_per_s",
    }
    assert set(by_kind) == {"derived", "published", "assumed"}
    assert "0.8 of it, assumed" in profile.source


def test_without_the_package_pcie_figure_every_tier_figure_is_assumed() -> None:
    committed = _committed("llama-3.1-8b")
    profile = h100_profile(
        "llama-3.1-8b", 1, committed.prefill_coeffs, committed.decode_coeffs, None
    )
    assert profile.tiers["cpu"].bandwidth_bytes_per_s == 25e9
    assert profile.provenance["tiers.cpu.bandwidth_bytes_per_s"] == "assumed"
    assert "published" not in profile.provenance.values()
    assert "gives no PCIe bandwidth" in profile.source
    assert "PCIe figure is published" not in profile.source
