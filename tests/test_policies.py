import math
from dataclasses import replace as dataclass_replace

import pytest
from vllm.v1.core.block_pool import BlockPool

from continuum_tiered.core.pins import Pin, PinTable
from continuum_tiered.core.profile import PROFILE_VERSION, ModelShape, Tier, TierProfile
from continuum_tiered.core.ttl import EtaEstimator, TTLDecision
from continuum_tiered.policies import (
    DEFAULT_POLICY,
    POLICIES,
    ContinuumPolicy,
    NoRetentionPolicy,
    RetentionPolicy,
    StaticTTLPolicy,
    TieredPolicy,
    TurnEnd,
    make_policy,
)
from continuum_tiered.policies.infercept import InferCeptPolicy

# 1000 bytes per token; prefill 1 ms per token; CPU reload 0.1 ms per token.
PROFILE = TierProfile(
    version=PROFILE_VERSION,
    model=ModelShape("m", num_layers=1, num_kv_heads=1, head_dim=250, dtype_bytes=2),
    device="cpu",
    tiers={"cpu": Tier("cpu", bandwidth_bytes_per_s=1e7, latency_s=0.0)},
    prefill_coeffs=(0.0, 1e-3, 0.0),
    source="unit test",
)


def _turn(
    tool: str | None = "ls",
    tokens: int = 3000,
    tier: str | None = None,
    last: bool = False,
    can_offload: bool = True,
):
    return TurnEnd("p", tool, tokens, last, now_s=0.0, tier=tier, can_offload=can_offload)


def test_registry() -> None:
    assert set(POLICIES) == {"tiered", "continuum", "static-ttl", "none", "infercept"}
    assert DEFAULT_POLICY == "tiered"
    assert all(cls.name == name for name, cls in POLICIES.items())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_last_turn_is_never_pinned(name: str) -> None:
    policy = make_policy(name, PROFILE)
    assert policy.decide(_turn(last=True)) == TTLDecision(0.0, 0.0, "last-turn")


def test_static_policies() -> None:
    assert make_policy("static-ttl", PROFILE).decide(_turn()) == TTLDecision(2.0, 0.0, "static")
    assert StaticTTLPolicy(ttl_s=0.5).decide(_turn()).ttl_s == 0.5
    assert NoRetentionPolicy().decide(_turn()) == TTLDecision(0.0, 0.0, "static")
    with pytest.raises(ValueError):
        StaticTTLPolicy(ttl_s=-1.0)


def test_continuum_cold_start_uses_exponential_optimum() -> None:
    policy = ContinuumPolicy(PROFILE)
    decision = policy.decide(_turn(tokens=3000))  # prefill 3 s
    assert decision == TTLDecision(pytest.approx(math.log(3.0)), pytest.approx(3.0), "cold-start")
    short = policy.decide(_turn(tokens=500))  # 0.5 s: pinning cannot pay under Exp(1 s)
    assert (short.ttl_s, short.source) == (0.0, "cold-start")


def test_continuum_benefit_uses_the_tier_and_queue_delay() -> None:
    policy = ContinuumPolicy(PROFILE, eta_min_programs=1)
    assert policy.decide(_turn(tokens=3000, tier="cpu")).benefit_s == pytest.approx(0.3)
    for delay in (1.0, 3.0):
        policy.observe_queue_delay(delay)
    for _ in range(3):
        policy.observe_program_finished(10)  # fixed length: eta = 1
    assert policy.eta.value == pytest.approx(1.0)
    assert policy.queue_delay.value == 2.0
    assert policy.decide(_turn(tokens=3000, tier="cpu")).benefit_s == pytest.approx(2.3)
    assert policy.decide(_turn(tokens=3000)).benefit_s == pytest.approx(5.0)


def test_kv_in_the_remote_tier_is_priced_at_its_reload() -> None:
    """A profile's remote tier (Redis, 0.5 ms per token here) prices the KV a policy will
    find there: between the CPU tier's reload and a recompute."""
    remote = Tier("remote", bandwidth_bytes_per_s=2e6, latency_s=0.0)
    policy = ContinuumPolicy(dataclass_replace(PROFILE, tiers={**PROFILE.tiers, "remote": remote}))
    benefit = {
        tier: policy.decide(_turn(tokens=3000, tier=tier)).benefit_s
        for tier in ("cpu", "remote", None)
    }
    assert benefit == {
        "cpu": pytest.approx(0.3),
        "remote": pytest.approx(1.5),
        None: pytest.approx(3.0),
    }


def test_continuum_benefit_follows_each_new_observation() -> None:
    """T_q and eta are kept between reads: every observation must show in the next one."""
    policy = ContinuumPolicy(PROFILE, eta_min_programs=2)
    policy.observe_queue_delay(4.0)
    assert policy.decide(_turn(tokens=3000)).benefit_s == pytest.approx(4.0 + 3.0)
    fresh = EtaEstimator(min_programs=2)
    for turns in (1, 2, 6, 3):
        policy.observe_program_finished(turns)
        fresh.program_finished(turns)
    policy.observe_queue_delay(2.0)  # T_q: mean of 4 and 2
    assert 0.0 < fresh.value < 1.0
    assert policy.decide(_turn(tokens=3000)).benefit_s == pytest.approx(3.0 * fresh.value + 3.0)


def test_continuum_learned_distributions() -> None:
    policy = ContinuumPolicy(PROFILE, min_samples=10)
    for _ in range(10):
        policy.observe_tool_duration("ls", 0.25)
    for _ in range(5):
        policy.observe_tool_duration("pytest", 20.0)

    # ls has its own CDF: every call is back within 0.25 s.
    assert policy.decide(_turn("ls", tokens=1000)) == TTLDecision(0.25, 1.0, "tool")
    # pytest has 5 samples < 10: the global CDF (2/3 at 0.25 s, all by 20 s).
    # benefit 3 s: 2/3 * 3 - 0.25 = 1.75 beats 3 - 20 and 0.
    assert policy.decide(_turn("pytest", tokens=3000)) == TTLDecision(0.25, 3.0, "global")
    # benefit 60 s: waiting for pytest pays, 60 - 20 = 40 > 2/3 * 60 - 0.25.
    assert policy.decide(_turn("pytest", tokens=60_000)) == TTLDecision(20.0, 60.0, "global")
    assert policy.decide(_turn(None, tokens=1000)).source == "global"
    # A turn too cheap to redo is not worth pinning for even 0.25 s.
    assert policy.decide(_turn("ls", tokens=200)).ttl_s == 0.0


def test_continuum_exposes_its_estimators() -> None:
    policy = ContinuumPolicy(PROFILE, min_samples=1, duration_window=4, queue_window=2)
    for d in (1.0, 2.0, 3.0, 4.0, 5.0):
        policy.observe_tool_duration("x", d)
    assert policy.tool_durations.distribution("x").samples == (2.0, 3.0, 4.0, 5.0)
    for q in (1.0, 2.0, 4.0):
        policy.observe_queue_delay(q)
    assert policy.queue_delay.value == 3.0


def test_make_policy_errors() -> None:
    with pytest.raises(ValueError, match="continuum, infercept, none, static-ttl, tiered"):
        make_policy("lru", PROFILE)
    with pytest.raises(ValueError, match=r"ttl\b.*valid: ttl_s"):
        make_policy("static-ttl", PROFILE, ttl=3.0)
    with pytest.raises(ValueError, match="valid: none"):
        make_policy("none", PROFILE, ttl_s=1.0)
    assert make_policy("static-ttl", PROFILE, ttl_s=3.0).decide(_turn()).ttl_s == 3.0
    policy = make_policy("continuum", PROFILE, min_samples=5)
    assert isinstance(policy, ContinuumPolicy)
    assert policy.profile is PROFILE
    assert policy.tool_durations.min_samples == 5


def test_base_observers_are_no_ops() -> None:
    class Fixed(RetentionPolicy):
        name = "fixed"

        def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
            return TTLDecision(1.0, 0.0, "static")

    policy = Fixed()
    policy.observe_tool_duration("ls", 1.0)
    policy.observe_queue_delay(1.0)
    policy.observe_program_finished(3)
    assert policy.decide(_turn()) == TTLDecision(1.0, 0.0, "static")


def test_infercept_picks_the_least_memory_time_waste() -> None:
    """PROFILE: prefill 1 ms/token, CPU reload 0.1 ms/token (1000 B/token at 10 MB/s)."""
    policy = make_policy("infercept", PROFILE, default_duration_s=0.05)
    # 3000 tokens: preserve 3000*0.05 < swap 3000*2*0.3 < discard 3000*3.0
    short = policy.decide(_turn(tokens=3000))
    assert (short.source, short.offload, short.ttl_s) == ("preserve", False, 3600.0)
    for _ in range(5):
        policy.observe_tool_duration("pytest", 30.0)
    # A 30 s tool: swap (0.6 s of copies) wastes less than preserving for 30 s.
    long = policy.decide(_turn(tool="pytest", tokens=3000))
    assert (long.source, long.offload, long.ttl_s) == ("swap", True, 0.0)
    # Served without a lower tier, swap is no choice: a 3 s recompute beats a 30 s pin.
    no_tier = policy.decide(_turn(tool="pytest", tokens=3000, can_offload=False))
    assert (no_tier.source, no_tier.offload, no_tier.ttl_s) == ("discard", False, 0.0)


def test_infercept_discards_small_contexts_when_recompute_beats_copies() -> None:
    fast_prefill = TierProfile(
        version=PROFILE_VERSION,
        model=PROFILE.model,
        device="cpu",
        tiers=PROFILE.tiers,
        prefill_coeffs=(0.0, 1e-5, 0.0),
        source="unit test",
    )
    policy = make_policy("infercept", fast_prefill, default_duration_s=10.0)
    decision = policy.decide(_turn(tokens=100))
    assert (decision.source, decision.offload, decision.ttl_s) == ("discard", False, 0.0)


# --- tiered: decisions on hand-built cases, pressure order on vLLM's real BlockPool


def _bimodal_policy() -> TieredPolicy:
    """'pytest': 9 of 10 calls back within 0.5 s, 1 in 10 after 60 s."""
    policy = TieredPolicy(PROFILE, min_samples=10)
    for i in range(90):
        policy.observe_tool_duration("pytest", 0.1 + i * 0.004)
    for _ in range(10):
        policy.observe_tool_duration("pytest", 60.0)
    return policy


def _pin(blocks: list, program: str, seq: int, ttl: float, benefit: float) -> Pin:
    return Pin(program, seq, blocks, 0.0, ttl, "pytest", 32 * len(blocks), benefit)


def test_pin_is_kept_through_the_short_mode_and_not_for_the_long_one() -> None:
    policy = _bimodal_policy()
    decision = policy.decide(_turn("pytest", tokens=10_000))  # recompute: 10 s
    assert decision.ttl_s == pytest.approx(0.456)  # the last short sample
    assert decision.benefit_s == pytest.approx(10.0)


def test_kv_held_by_the_cpu_tier_is_not_worth_a_pin() -> None:
    policy = _bimodal_policy()
    decision = policy.decide(_turn("pytest", tokens=1_000, tier="cpu"))  # reload: 0.1 s
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
    released = table.release_until_free(free + 20)
    assert [p.program_id for p in released] == ["A"]
    released = table.release_until_free(free + 21)
    assert [p.program_id for p in released] == ["C"]
    assert table.get("B") is not None

    continuum = ContinuumPolicy(PROFILE)
    assert sorted(
        ["A", "B", "C"],
        key=lambda p: continuum.pressure_key(Pin(p, "ABC".index(p), [], 0.0, 1.0, None, 0), 0.0),
    ) == ["C", "B", "A"]


def test_per_tool_state_is_bounded_under_unique_tool_names() -> None:
    for policy in (InferCeptPolicy(PROFILE, max_tools=8), ContinuumPolicy(PROFILE, max_tools=8)):
        for i in range(10_000):
            policy.observe_tool_duration(f"tool{i}", 0.5)
        per_tool = getattr(policy, "_by_tool", None) or policy.tool_durations._tools
        assert len(per_tool) == 8
