"""The tier lookups, the disk-write guard and the CPU build's connector read or patch
LMCache's internals, so on an LMCache they were not checked against they refuse to start,
naming the version and the versions checked, instead of misreading it or switching
themselves off (test_tiers_e2e covers them on the checked version)."""

from __future__ import annotations

import importlib.metadata
import re

import pytest

from continuum_tiered.vllm import compat
from continuum_tiered.vllm.lmcache.cpu_build import install
from continuum_tiered.vllm.lmcache.residency import LMCacheResidency, guard_disk_writes

INSTALLED = importlib.metadata.version("lmcache")


@pytest.fixture
def checked_only_against_another_lmcache(monkeypatch):
    """The installed LMCache cannot be swapped in a test: the list of checked versions is
    set to one it is not (the only stand-in here)."""
    monkeypatch.setattr(compat, "CHECKED_LMCACHE", ("9.9.9",))


REFUSAL = rf"checked against LMCache 9\.9\.9; this is LMCache {re.escape(INSTALLED)}"


@pytest.mark.parametrize(
    "start", [LMCacheResidency, guard_disk_writes], ids=["tier-lookups", "disk-write-guard"]
)
def test_what_reads_lmcache_internals_refuses_an_unchecked_lmcache(
    checked_only_against_another_lmcache, start
):
    with pytest.raises(compat.CompatError, match=REFUSAL):
        start()


def test_the_cpu_connector_refuses_an_unchecked_lmcache(checked_only_against_another_lmcache):
    import lmcache

    if lmcache.torch_device_type != "cpu":
        pytest.skip("LMCache has its own connector here: install() patches nothing")
    with pytest.raises(compat.CompatError, match=REFUSAL):
        install()


def test_the_installed_lmcache_is_checked_and_has_every_name_we_use():
    assert INSTALLED in compat.CHECKED_LMCACHE
    assert compat.missing_private_api(compat.LMCACHE_PRIVATE_API) == []
    compat.check_lmcache()
    LMCacheResidency()  # starts: no engine in this process, so it finds nothing
