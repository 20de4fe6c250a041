"""The version and private-API check the connector runs at start (continuum_tiered.vllm.compat)."""

from __future__ import annotations

import logging
import re

import pytest

from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.vllm import compat


def test_the_installed_vllm_is_checked_and_has_every_name_we_use():
    assert compat.is_checked(compat.vllm_version())
    assert compat.missing_private_api() == []
    compat.check_vllm()


def test_a_renamed_private_name_is_reported_by_where_it_lived():
    gone = compat.PrivateName("vllm.v1.core.block_pool", "BlockPool", "no_such_attr", "test")
    assert compat.missing_private_api([gone, *compat.VLLM_PRIVATE_API]) == [gone]
    assert "vllm.v1.core.block_pool.BlockPool.no_such_attr" in str(gone)


@pytest.mark.parametrize("version", ["0.34.0", "0.31.2", "0.3.2", "1.0.0"])
def test_a_vllm_outside_the_matrix_is_refused_by_name(version, monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED, raising=False)
    expected = rf"this is vLLM {re.escape(version)}\..*{compat.ALLOW_UNTESTED}"
    with pytest.raises(compat.CompatError, match=expected):
        compat.check_vllm(version)


def test_the_override_turns_the_refusal_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(compat.ALLOW_UNTESTED, "1")
    with caplog.at_level(logging.WARNING, logger="continuum_tiered.vllm.compat"):
        compat.check_vllm("0.34.0")
    assert "this is vLLM 0.34.0; running anyway" in caplog.text


def test_the_connector_refuses_to_start_on_an_unchecked_vllm(tiny_model_dir, monkeypatch):
    """The installed vLLM cannot be swapped in a test, so ``vllm_version`` is made to
    report another one (the only stand-in here); the connector then fails at start."""
    monkeypatch.delenv(compat.ALLOW_UNTESTED, raising=False)
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.40.0")
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=16,
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    with pytest.raises(compat.CompatError, match=r"this is vLLM 0\.40\.0"):
        SchedulerDriver(cfg, build_vllm_config(cfg))


@pytest.mark.parametrize("version", ["0.5.7", "0.5.5", "0.6.0", "1.0.0"])
def test_an_lmcache_outside_the_checked_list_is_refused_by_name(version):
    """No override: LMCache's internals are read exactly as the checked versions lay them out."""
    checked = re.escape(", ".join(compat.CHECKED_LMCACHE))
    expected = rf"checked against LMCache {checked}; this is LMCache {re.escape(version)}$"
    with pytest.raises(compat.CompatError, match=expected):
        compat.check_lmcache(version)
