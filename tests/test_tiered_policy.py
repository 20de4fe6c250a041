"""The ``tiered`` policy's decisions on hand-built cases, and its pressure order on
vLLM's real BlockPool."""

from __future__ import annotations

import pytest
from vllm.v1.core.block_pool import BlockPool

from continuum_tiered.pins import Pin, PinTable
from continuum_tiered.policies import ContinuumPolicy, TieredPolicy, TurnEnd
from continuum_tiered.profile import PROFILE_VERSION, ModelShape, Tier, TierProfile

# 1000 bytes per token; prefill 1 ms per token; CPU reload 0.1 ms per token.
PROFILE = TierProfile(
    version=PROFILE_VERSION,
    model=ModelShape("m", num_layers=1, num_kv_heads=1, head_dim=250, dtype_bytes=2),
    device="cpu",
    tiers={"cpu": Tier("cpu", bandwidth_bytes_per_s=1e7, latency_s=0.0)},
    prefill_coeffs=(0.0, 1e-3, 0.0),
    source="unit test",
)


def _bimodal_policy() -> TieredPolicy:
    """'pytest': 9 of 10 calls back within 0.5 s, 1 in 10 after 60 s."""
    policy = TieredPolicy(PROFILE, min_samples=10)
    for i in range(90):
        policy.observe_tool_duration("pytest", 0.1 + i * 0.004)
    for _ in range(10):
        policy.observe_tool_duration("pytest", 60.0)
    return policy


def _turn(tokens: int, tier: str | None = None) -> TurnEnd:
    return TurnEnd("p", "pytest", tokens, last_turn=False, now_s=0.0, tier=tier)


def _pin(blocks: list, program: str, seq: int, ttl: float, benefit: float) -> Pin:
    return Pin(program, seq, blocks, 0.0, ttl, "pytest", 32 * len(blocks), benefit)


def test_pin_is_kept_through_the_short_mode_and_not_for_the_long_one() -> None:
    policy = _bimodal_policy()
    decision = policy.decide(_turn(tokens=10_000))  # recompute: 10 s
    assert decision.ttl_s == pytest.approx(0.456)  # the last short sample
    assert decision.benefit_s == pytest.approx(10.0)


def test_kv_held_by_the_cpu_tier_is_not_worth_a_pin() -> None:
    policy = _bimodal_policy()
    decision = policy.decide(_turn(tokens=1_000, tier="cpu"))  # reload: 0.1 s
    assert (decision.ttl_s, decision.benefit_s) == (0.0, pytest.approx(0.1))


def test_return_probability_falls_once_the_short_mode_has_passed() -> None:
    policy = _bimodal_policy()
    pin = _pin([], "A", 0, ttl=0.456, benefit=10.0)
    assert policy.return_probability(pin, now_s=0.0) == pytest.approx(0.9)
    # 0.298 s in: 50 short samples are gone; 40 of the 50 left are within the TTL.
    assert policy.return_probability(pin, now_s=0.298) == pytest.approx(0.8)
    pin = _pin([], "A", 0, ttl=61.0, benefit=10.0)
    # 1 s after the call: only the 60 s mode is left, and it is inside the TTL.
    assert policy.return_probability(pin, now_s=1.0) == pytest.approx(1.0)
    # Past every sample: nothing says the program is coming back.
    assert policy.return_probability(_pin([], "A", 0, 70.0, 10.0), now_s=65.0) == 0.0
    # Overdue pins are only kept while their program waits: it is back.
    assert policy.return_probability(pin, now_s=62.0) == 1.0


def test_cold_start_return_probability_is_exponential() -> None:
    policy = TieredPolicy(PROFILE)
    pin = Pin("A", 0, [], 0.0, 2.0, "unseen", 32, 5.0)
    assert policy.return_probability(pin, now_s=1.0) == pytest.approx(1 - 2.718281828**-1)


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(num_gpu_blocks=64, enable_caching=True, hash_block_size=32)


def _blocks(pool: BlockPool, n: int) -> list:
    blocks = pool.get_new_blocks(n)
    pool.free_blocks(blocks)
    return blocks


def test_pressure_releases_the_least_saving_per_block_first(pool: BlockPool) -> None:
    """A: old program, large pin, its tool far past the short mode. B: newer, small,
    its tool about to return. C: newest, same as B but twice the blocks. Continuum
    would release C, then B; tiered releases A, then C, and keeps B."""
    policy = _bimodal_policy()
    now = [0.0]
    table = PinTable(pool, lambda pin: policy.pressure_key(pin, now[0]))
    a = _pin(_blocks(pool, 20), "A", 0, ttl=0.456, benefit=10.0)
    table.pin(a)
    now[0] = 0.3
    table.pin(Pin("B", 1, _blocks(pool, 4), 0.3, 0.756, "pytest", 128, 10.0))
    table.pin(Pin("C", 2, _blocks(pool, 8), 0.3, 0.756, "pytest", 256, 10.0))
    now[0] = 0.45  # A's program has been away 0.45 s: few short samples left
    free = pool.get_num_free_blocks()
    released = table.release_for(free + 20)
    assert [p.program_id for p in released] == ["A"]
    released = table.release_for(free + 21)
    assert [p.program_id for p in released] == ["C"]
    assert table.get("B") is not None

    continuum = ContinuumPolicy(PROFILE)
    assert sorted(
        ["A", "B", "C"],
        key=lambda p: continuum.pressure_key(Pin(p, "ABC".index(p), [], 0.0, 1.0, None, 0), 0.0),
    ) == ["C", "B", "A"]
