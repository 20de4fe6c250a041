"""The cost-aware load decision: a tier hit is loaded or recomputed, priced over two turns
and, with layer-wise loads, at what the prompt's own compute does not hide; and the model
of LMCache's tiers it reads (``TierStore``) with the remote tier."""

from __future__ import annotations

import math

from continuum_tiered.core.profile import Tier
from continuum_tiered.core.tier_model import LoadCost, TierStore

BLOCK = 16
BLOCK_BYTES = 1000
# Prefill: 1 ms per token, no attention term; a 2-block hit (32 tokens) costs 32 ms.
PREFILL = (0.010, 0.001, 0.0)


def cost(disk_s_per_block: float, cpu_s_per_block: float, layerwise: bool = False) -> LoadCost:
    tiers = {
        "cpu": Tier("cpu", BLOCK_BYTES / cpu_s_per_block, 0.0),
        "disk": Tier("disk", BLOCK_BYTES / disk_s_per_block, 0.0),
    }
    return LoadCost(tiers, BLOCK, BLOCK_BYTES, PREFILL, layerwise)


def test_a_cpu_hit_is_loaded_only_when_faster_than_its_prefill() -> None:
    # Nothing to promote: one turn decides. 2 blocks x 15 ms = 30 ms < 32 ms.
    assert cost(1.0, 0.015).load_pays(0, ["cpu", "cpu"], prompt_tokens=33)
    assert not cost(1.0, 0.017).load_pays(0, ["cpu", "cpu"], prompt_tokens=33)


def test_a_disk_hit_is_priced_with_the_promotion_it_buys() -> None:
    """40 ms from disk is slower than the 32 ms prefill, but the load moves the blocks to
    the CPU tier (2 ms next turn) while a recompute leaves them on disk: 42 < 64 ms."""
    assert cost(0.020, 0.001).load_pays(0, ["disk", "disk"], prompt_tokens=33)
    # 70 ms + 2 ms is more than two prefills: recomputed.
    assert not cost(0.035, 0.001).load_pays(0, ["disk", "disk"], prompt_tokens=33)
    # A slow CPU tier takes the promotion's worth away: 40 + 40 ms > 64 ms.
    assert not cost(0.020, 0.020).load_pays(0, ["disk", "disk"], prompt_tokens=33)


def test_a_layerwise_load_hides_behind_the_prompt_after_the_hit() -> None:
    """A 40 ms CPU hit is slower than its 32 ms prefill; the 16 tokens after it take
    16 ms more, under which a layer-wise load runs."""
    hit = ["cpu", "cpu"]
    assert not cost(1.0, 0.020).load_pays(0, hit, prompt_tokens=48)
    assert cost(1.0, 0.020, layerwise=True).load_pays(0, hit, prompt_tokens=48)
    # Nothing after the hit: nothing hides it.
    assert not cost(1.0, 0.020, layerwise=True).load_pays(0, hit, prompt_tokens=32)


def test_the_prefill_is_the_hits_after_the_gpu_prefix() -> None:
    """With a quadratic term, the hit's tokens cost more after a long cached prefix."""
    tiers = {"cpu": Tier("cpu", BLOCK_BYTES / 0.040, 0.0), "disk": Tier("disk", 1.0, 0.0)}
    quadratic = LoadCost(tiers, BLOCK, BLOCK_BYTES, (0.0, 0.001, 1e-6))
    assert not quadratic.load_pays(0, ["cpu"], prompt_tokens=17)  # 40 ms > 16 ms
    assert quadratic.load_pays(10_000, ["cpu"], prompt_tokens=10_017)  # 40 < 16 + 320 ms


def test_a_remote_hit_is_priced_like_a_disk_hit_and_an_unpriced_tier_is_loaded() -> None:
    """A load from Redis promotes to the CPU tier as a disk load does; a tier the profile
    has no figures for is loaded, as LMCache alone would."""
    remote = {**cost(1.0, 0.001).tiers, "remote": Tier("remote", BLOCK_BYTES / 0.020, 0.0)}
    priced = LoadCost(remote, BLOCK, BLOCK_BYTES, PREFILL)
    assert priced.load_pays(0, ["remote", "remote"], prompt_tokens=33)  # 40 + 2 < 64 ms
    slow = {**remote, "remote": Tier("remote", BLOCK_BYTES / 0.035, 0.0)}
    assert not LoadCost(slow, BLOCK, BLOCK_BYTES, PREFILL).load_pays(0, ["remote"] * 2, 33)
    assert cost(1.0, 0.001).load_pays(0, ["cpu", "remote"], prompt_tokens=33)


def test_the_remote_tier_is_written_through_and_found_last() -> None:
    store = TierStore.sized(2 * BLOCK_BYTES, BLOCK_BYTES, BLOCK_BYTES, math.inf)
    for key in "abcd":
        store.store(key)
    # c, d in CPU; b pushed to disk; a pushed off disk, still in the remote tier.
    assert store.lookup(list("abcd")) == ["remote", "disk", "cpu", "cpu"]
    assert store.lookup(["e", "a"]) == []
    assert store.tier_of_prefix(3) == "disk" and store.tier_of_prefix(10**6) == "remote"
    no_remote = TierStore.sized(2 * BLOCK_BYTES, BLOCK_BYTES, BLOCK_BYTES)
    for key in "abcd":
        no_remote.store(key)
    assert not no_remote.has_remote and no_remote.lookup(["a"]) == []
    assert no_remote.tier_of_prefix(4) is None
