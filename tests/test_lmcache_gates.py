"""The tier lookups read LMCache's internals, so on an LMCache they were not checked against
they switch themselves off, saying so, instead of failing or misreading it (the disk-write
guard does the same; test_tiers_e2e covers it on the checked version)."""

from __future__ import annotations

import logging

import pytest

from continuum_tiered.vllm.lmcache import residency as lmcache_residency
from continuum_tiered.vllm.lmcache.residency import LMCacheResidency


@pytest.fixture
def checked_only_against_another_lmcache(monkeypatch):
    """The installed LMCache cannot be swapped in a test: the lists of checked versions are
    set to one it is not (the only stand-in here)."""
    monkeypatch.setattr(lmcache_residency, "RESIDENCY_CHECKED_VERSIONS", ("9.9.9",))
    monkeypatch.setattr(lmcache_residency, "DISK_GUARD_CHECKED_VERSIONS", ("9.9.9",))


def test_tier_lookups_answer_nowhere_on_an_unchecked_lmcache(
    checked_only_against_another_lmcache, caplog
):
    with caplog.at_level(logging.WARNING):
        residency = LMCacheResidency()
    assert "not one of the versions its tier lookup was checked against (9.9.9)" in caplog.text
    assert residency.spans(list(range(512))) == []
    assert residency.tier_of(list(range(512))) is None
    assert residency.forget_vanished_disk_chunks(list(range(512))) == 0
