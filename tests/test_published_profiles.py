"""The built-in H100 profiles derived from aiconfigurator-core's published kernel tables.

Fast: reads only the committed JSON, not the wheel's parquet tables.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.profile import ModelShape, TierProfile, load_named_profile

MODELS = ("llama-3.1-8b", "llama-3.1-70b-tp4")


def _profile(model: str) -> TierProfile:
    hf = Deployment(model=model).hf_config()
    return load_named_profile(
        f"h100-{model}",
        expect_model=ModelShape.from_hf_config(hf, name=model),
        expect_device="cuda",
    )


@pytest.mark.parametrize("model", MODELS)
def test_loads_for_its_deployment_with_decode_and_provenance(model: str) -> None:
    profile = _profile(model)
    assert profile.model.name == model
    assert profile.decode_coeffs is not None
    assert "aiconfigurator-core" in profile.source
    assert "derive_h100_profiles.py" in profile.source
    assert set(profile.tiers) == {"cpu", "disk"}


def test_8b_sanity_bounds() -> None:
    profile = _profile("llama-3.1-8b")
    assert 0.1 < profile.prefill_time(8192) < 1.0
    assert 3e-3 < profile.decode_step_time(1, 8192) < 30e-3


def test_70b_tp4_slower_per_token_than_8b() -> None:
    small, large = _profile("llama-3.1-8b"), _profile("llama-3.1-70b-tp4")
    for n in (1024, 8192, 32768):
        assert large.prefill_time(n) > small.prefill_time(n)
    for batch in (1, 64):
        assert large.decode_step_time(batch, 8192) > small.decode_step_time(batch, 8192)


def test_derivation_module_imports_without_its_table_readers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """pyarrow and yaml are needed only to read the wheel, not to import the module."""
    for name in ("pyarrow", "pyarrow.parquet", "yaml"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    monkeypatch.delitem(sys.modules, "continuum_tiered.profiling.published", raising=False)
    published = importlib.import_module("continuum_tiered.profiling.published")
    assert published.fit_decode([(1, 1024, 1.0), (2, 1024, 2.0), (4, 2048, 4.0)])


def test_fit_decode_recovers_nonnegative_coefficients() -> None:
    from continuum_tiered.profiling.published import fit_decode

    truth = (5e-3, 1e-5, 4e-8)
    points = [
        (b, c, truth[0] + truth[1] * b + truth[2] * b * c)
        for b in (1, 8, 64)
        for c in (1024, 8192, 65536)
    ]
    assert fit_decode(points) == pytest.approx(truth, rel=1e-6)
    # A falling trend in batch would need d1 < 0: the fit clamps it to zero instead.
    d0, d1, d2 = fit_decode([(1, 1, 3.0), (2, 1, 2.0), (4, 1, 1.0)])
    assert min(d0, d1, d2) >= 0 and d1 == 0
