"""ContinuumConnector inside vLLM's real Scheduler and BlockPool, driven without a model.

The forward pass is replaced by a fixed token per step (``SchedulerDriver``); block
allocation, prefix caching, admission and preemption are vLLM's own code.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from vllm.v1.request import RequestStatus

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.core.profile import PROFILE_VERSION, ModelShape, TierProfile
from continuum_tiered.core.programs import ProgramState
from continuum_tiered.policies import ContinuumPolicy, TieredPolicy
from continuum_tiered.policies.static_ttl import NoRetentionPolicy, StaticTTLPolicy
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.vllm.connectors.tier_link import NoTiers

BLOCK = 32
NUM_BLOCKS = 40  # 39 usable: block 0 is vLLM's null block

# A slow device: 10 ms of prefill per token, so a few hundred tokens of context are worth
# pinning for seconds under the cost-model policies' cold-start rule.
SLOW_PROFILE = TierProfile(
    version=PROFILE_VERSION,
    model=ModelShape("m", num_layers=1, num_kv_heads=1, head_dim=64, dtype_bytes=2),
    device="cpu",
    tiers={},
    prefill_coeffs=(0.0, 1e-2, 0.0),
    source="unit test",
)
POLICIES = {
    "static-ttl": lambda: StaticTTLPolicy(100.0),
    "tiered": lambda: TieredPolicy(SLOW_PROFILE),  # the default
    "continuum": lambda: ContinuumPolicy(SLOW_PROFILE),
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def driver_config(tiny_model_dir) -> tuple[DriverConfig, object]:
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK,
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    return cfg, build_vllm_config(cfg)


@pytest.fixture
def harness(driver_config) -> Iterator[Harness]:
    cfg, vllm_config = driver_config
    h = Harness(SchedulerDriver(cfg, vllm_config))
    yield h
    h.assert_no_leak()


class Harness:
    def __init__(self, driver: SchedulerDriver):
        self.driver = driver
        self.clock = Clock()
        driver.connector.bind_tiers(NoTiers(self.clock))
        self.pool = driver.block_pool
        self.initial_free = self.pool.get_num_free_blocks()
        self.set_ttl(100.0)

    @property
    def connector(self):
        return self.driver.connector

    def set_ttl(self, ttl_s: float) -> None:
        self.connector.policy = StaticTTLPolicy(ttl_s) if ttl_s > 0 else NoRetentionPolicy()

    def submit(self, rid: str, prompt: list[int], hints: ProgramHints | None, max_tokens=2):
        params = hints.to_params() if hints else None
        return self.driver.add_request(
            rid, prompt, max_tokens, arrival_time=self.clock.now, kv_transfer_params=params
        )

    def step(self):
        result = self.driver.step()
        self.clock.now += 0.01
        return result

    def run(self, *rids: str, max_steps: int = 500) -> None:
        pending = set(rids)
        for _ in range(max_steps):
            pending -= set(self.step().finished_request_ids)
            if not pending:
                return
        raise AssertionError(f"requests {sorted(pending)} did not finish")

    def turn(self, rid, prompt, hints, max_tokens=2) -> list[int]:
        """Run one turn to completion; return the prompt extended by its output."""
        request = self.submit(rid, prompt, hints, max_tokens)
        self.run(rid)
        return prompt + list(request.output_token_ids)

    def assert_no_leak(self) -> None:
        """Drain, then let every deadline pass: the engine's next step must leave no pin
        and no held block. Pins are not released by hand first: one that should be gone
        and is not is a leak."""
        for _ in range(1000):
            if not self.driver.scheduler.has_requests():
                break
            self.step()
        self.clock.now += 1e6
        self.step()
        assert len(self.connector.pins) == 0
        assert self.pool.get_num_free_blocks() == self.initial_free
        assert all(b.ref_cnt == 0 for b in self.pool.blocks[1:])


def tokens(seed: int, n: int) -> list[int]:
    """Random token ids: different seeds share no prefix block."""
    return random.Random(seed).choices(range(3, 500), k=n)


def test_finished_turn_is_pinned_and_next_turn_hits_it_after_pool_churn(harness):
    context = harness.turn("a0", tokens(0, 320), ProgramHints("A", 0, tool="grep"))
    pin = harness.connector.pins.get("A")
    assert pin is not None and pin.num_blocks == 10  # 322 tokens: 10 full blocks
    assert all(b.ref_cnt == 1 for b in pin.blocks)
    assert harness.pool.get_num_free_blocks() == harness.initial_free - 10

    # Two other programs churn the rest of the pool during A's tool call.
    harness.turn("b0", tokens(1000, 600), ProgramHints("B", 0, last_turn=True))
    harness.turn("c0", tokens(2000, 750), ProgramHints("C", 0, last_turn=True))

    harness.submit("a1", [*context, *tokens(3000, 40)], ProgramHints("A", 1))
    assert harness.step().prefix_hit_tokens("a1") == 320
    assert harness.connector.pins.get("A") is None  # handed over to the running turn
    harness.run("a1")
    stats = harness.connector._counters
    assert stats["pinned_prefix_hit_tokens"] == 320 and stats["pin_handovers"] == 1
    program = harness.connector.programs.get("A")
    assert program.turns_served == 2 and program.prefix_hit_tokens == 320
    harness.turn("a2", tokens(0, 10), ProgramHints("A", 2, last_turn=True))


def test_handover_counts_only_the_pinned_blocks_the_next_turn_holds(harness):
    """The next turn keeps 5 of the 10 pinned blocks and diverges after them: its pinned
    hit is those 5 blocks (counted by position, not over the whole pin)."""
    context = harness.turn("a0", tokens(0, 320), ProgramHints("A", 0, tool="grep"))
    assert harness.connector.pins.get("A").num_blocks == 10
    harness.submit("a1", [*context[: 5 * BLOCK], *tokens(3000, 200)], ProgramHints("A", 1))
    assert harness.step().prefix_hit_tokens("a1") == 5 * BLOCK
    assert harness.connector.pins.get("A") is None
    harness.run("a1")
    stats = harness.connector._counters
    assert stats["pinned_prefix_hit_tokens"] == 5 * BLOCK and stats["pin_handovers"] == 1
    assert harness.connector.programs.get("A").prefix_hit_tokens == 5 * BLOCK
    harness.turn("a2", tokens(0, 10), ProgramHints("A", 2, last_turn=True))


def test_without_pins_the_same_churn_evicts_the_prefix(harness):
    harness.set_ttl(0)
    context = harness.turn("a0", tokens(0, 320), ProgramHints("A", 0, tool="grep"))
    assert harness.connector.pins.get("A") is None
    harness.turn("b0", tokens(1000, 600), ProgramHints("B", 0, last_turn=True))
    harness.turn("c0", tokens(2000, 750), ProgramHints("C", 0, last_turn=True))
    harness.submit("a1", [*context, *tokens(3000, 40)], ProgramHints("A", 1))
    assert harness.step().prefix_hit_tokens("a1") == 0
    harness.run("a1")


def test_pin_expires_at_deadline(harness):
    harness.set_ttl(5.0)
    harness.turn("a0", tokens(0, 320), ProgramHints("A", 0))
    harness.clock.now += 4.0
    harness.step()
    assert harness.connector.pins.get("A") is not None
    harness.clock.now += 1.5
    harness.step()
    assert harness.connector.pins.get("A") is None
    assert harness.connector.pins.releases[ReleaseReason.EXPIRED] == 1


def test_waiting_request_is_admitted_by_releasing_latest_program_pin_first(harness):
    harness.turn("a0", tokens(0, 320), ProgramHints("A", 0))
    harness.turn("c0", tokens(1000, 320), ProgramHints("C", 0))
    assert harness.pool.get_num_free_blocks() == harness.initial_free - 20  # 19 free

    big = harness.submit("b0", tokens(2000, 800), ProgramHints("B", 0, last_turn=True))
    result = harness.step()
    assert "b0" in result.scheduler_output.num_scheduled_tokens  # admitted in this step
    assert big.num_computed_tokens > 0
    assert harness.connector.pins.get("C") is None  # C arrived last: released first
    assert harness.connector.pins.get("A") is not None
    assert harness.connector.pins.releases[ReleaseReason.PRESSURE] == 1
    harness.run("b0")


def test_running_request_grows_by_releasing_pins_not_by_preemption(harness):
    harness.turn("a0", tokens(0, 320), ProgramHints("A", 0))
    # 28 blocks of prompt fit beside the pin; decoding 70 tokens needs 3 blocks more.
    d = harness.submit("d0", tokens(1000, 896), ProgramHints("D", 0, last_turn=True), 70)
    harness.run("d0")
    assert d.num_preemptions == 0
    assert harness.connector.pins.get("A") is None
    assert harness.connector.pins.releases[ReleaseReason.PRESSURE] == 1


def test_aborted_turn_is_never_pinned(harness):
    harness.submit("a0", tokens(0, 320), ProgramHints("A", 0), max_tokens=50)
    harness.step()
    harness.driver.scheduler.finish_requests("a0", RequestStatus.FINISHED_ABORTED)
    harness.step()
    assert len(harness.connector.pins) == 0


def test_last_turn_ends_the_program_and_releases_its_pin(harness):
    context = harness.turn("a0", tokens(0, 320), ProgramHints("A", 0))
    assert harness.connector.pins.get("A") is not None
    harness.turn("a1", [*context, *tokens(900, 40)], ProgramHints("A", 1, last_turn=True))
    assert len(harness.connector.pins) == 0
    assert harness.connector.programs.get("A") is None


def test_malformed_hints_are_ignored_and_the_request_served(harness, caplog):
    bad = {"continuum": {"program_id": "A", "turn": "first"}}
    harness.driver.add_request("x0", tokens(0, 100), 2, harness.clock.now, kv_transfer_params=bad)
    harness.run("x0")
    assert harness.connector._counters["hints_rejected"] == 1
    assert len(harness.connector.pins) == 0


def test_requests_without_hints_pass_through(harness):
    harness.turn("plain", tokens(0, 320), None)
    assert len(harness.connector.pins) == 0
    assert len(harness.connector.programs) == 0


# --------------------------------------------------------------- issue 18 regressions


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("shared_blocks", [0, 5])
def test_next_turn_that_diverges_from_its_own_pin_is_admitted(harness, policy, shared_blocks):
    """Context compaction: the next prompt reuses only ``shared_blocks`` of the pinned
    30, and pin + new prompt exceed the pool. The program's own pin must give way (it used
    to be spared, and vLLM's admission loop then stalled every program behind it)."""
    harness.connector.policy = POLICIES[policy]()
    context = harness.turn("a0", tokens(0, 960), ProgramHints("A", 0, tool="grep"))
    assert harness.connector.pins.get("A").num_blocks == 30
    compacted = context[: shared_blocks * BLOCK] + tokens(1, 640 - shared_blocks * BLOCK)
    a1 = harness.submit("a1", compacted, ProgramHints("A", 1))
    b0 = harness.submit("b0", tokens(2, 64), ProgramHints("B", 0, last_turn=True))
    result = harness.step()
    assert result.prefix_hit_tokens("a1") == shared_blocks * BLOCK
    assert harness.connector.pins.get("A") is None
    harness.run("a1", "b0")
    assert a1.num_preemptions == 0 and b0.num_preemptions == 0


def test_request_too_large_even_without_pins_releases_none(harness):
    """Pins give way only where that makes room: while a running request holds the rest
    of the pool, a head-of-queue request that would not fit with every pin gone must not
    flush them all on every step. Once the running request ends it fits beside the pin."""
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0))  # 10 blocks pinned
    runner = harness.submit("r0", tokens(1, 640), None, max_tokens=20)  # 20 blocks
    harness.step()
    head = harness.submit("h0", tokens(2, 640), None)  # 20 blocks: 9 free + 10 pinned
    for _ in range(10):
        harness.step()
        assert harness.connector.pins.get("A") is not None
        assert head.num_computed_tokens == 0
    harness.run("r0", "h0")
    assert runner.num_preemptions == 0
    assert harness.connector.pins.get("A") is not None
    assert harness.connector.pins.releases[ReleaseReason.PRESSURE] == 0


def test_overdue_pin_goes_before_a_live_one_under_the_default_policy(harness):
    """An idle engine runs no step, so nothing expires a pin at its deadline; the first
    request after the gap must find the overdue pin gone, not the live one (the tiered
    policy ranked a pin past its deadline as certain to be used, and kept it)."""
    harness.set_ttl(5.0)
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0))
    harness.set_ttl(1000.0)
    harness.turn("b0", tokens(1, 318), ProgramHints("B", 0))
    harness.connector.policy = TieredPolicy(SLOW_PROFILE)
    harness.clock.now += 60.0  # idle: A is long overdue
    harness.submit("c0", tokens(2, 800), ProgramHints("C", 0, last_turn=True))  # 25 blocks
    harness.step()
    assert harness.connector.pins.get("A") is None
    assert harness.connector.pins.get("B") is not None
    assert harness.connector.pins.releases[ReleaseReason.EXPIRED] == 1
    assert harness.connector.pins.releases[ReleaseReason.PRESSURE] == 0


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_running_batch_grows_into_pin_blocks_in_the_same_step(harness, policy):
    """A pin holds half the pool and three running requests need a block each for their
    next token: every step must schedule all three, with no preemption. (Freeing the pin
    from ``has_pending_block_frees`` made vLLM stop scheduling running requests for the
    step while newcomers took the blocks.)"""
    harness.connector.policy = POLICIES[policy]()
    harness.turn("a0", tokens(0, 640), ProgramHints("A", 0))
    assert harness.connector.pins.get("A").num_blocks == 20
    runners = [harness.submit(f"r{i}", tokens(10 + i, 192), None, max_tokens=60) for i in range(3)]
    for _ in range(59):
        scheduled = harness.step().scheduler_output.num_scheduled_tokens
        assert set(scheduled) == {"r0", "r1", "r2"}
    assert all(r.num_preemptions == 0 for r in runners)
    assert harness.connector.pins.get("A") is None
    assert harness.connector.pins.releases[ReleaseReason.PRESSURE] == 1
    harness.run("r0", "r1", "r2")


def test_starved_running_request_holds_admissions_for_the_step(harness):
    """The fallback, when the step's estimate fell short: pins freed for a running request
    are not handed to a newcomer in the same step."""
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0))
    newcomer = harness.submit("n0", tokens(1, 64), None)
    assert harness.connector.has_pending_block_frees() is True
    assert harness.connector.pins.get("A") is None
    assert harness.connector.get_num_new_matched_tokens(newcomer, 0) == (None, False)
    assert harness.connector.has_pending_block_frees() is False  # nothing left to free
    harness.run("n0")  # the hold ends with the step
    assert newcomer.num_preemptions == 0


def test_prefix_cache_reset_drops_pins(harness):
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0, tool="grep"))
    assert harness.driver.scheduler.reset_prefix_cache() is True
    assert len(harness.connector.pins) == 0
    assert harness.connector.pins.releases[ReleaseReason.CACHE_RESET] == 1
    assert harness.connector.programs.get("A").state is ProgramState.EVICTED
    assert harness.pool.get_num_free_blocks() == harness.initial_free


def test_prefix_cache_reset_that_fails_anyway_keeps_the_pins(harness):
    """A reset refused because a running request holds blocks must not cost every pin."""
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0))
    harness.submit("r0", tokens(1, 100), None, max_tokens=20)
    harness.step()
    assert harness.driver.scheduler.reset_prefix_cache() is False
    assert harness.connector.pins.get("A") is not None
    harness.run("r0")
    assert harness.driver.scheduler.reset_prefix_cache() is True


def test_reset_with_running_requests_preempts_them_and_drops_pins(harness):
    """``reset_prefix_cache(reset_running_requests=True)`` (sleep, weight updates) raised
    "Failed to reset KV cache" while a pin was held."""
    harness.turn("a0", tokens(0, 318), ProgramHints("A", 0))
    runner = harness.submit("r0", tokens(1, 100), None, max_tokens=20)
    harness.step()
    assert harness.driver.scheduler.reset_prefix_cache(reset_running_requests=True) is True
    assert len(harness.connector.pins) == 0
    harness.run("r0")
    assert runner.num_preemptions == 1


def test_aborted_turns_leave_their_programs_evictable(harness):
    for i in range(20):
        harness.submit(f"x{i}", tokens(i, 40), ProgramHints(f"P{i}", 0), max_tokens=50)
    harness.step()
    harness.driver.scheduler.finish_requests(
        [f"x{i}" for i in range(20)], RequestStatus.FINISHED_ABORTED
    )
    harness.step()
    states = {p.state for p in harness.connector.programs}
    assert states == {ProgramState.IDLE}
    assert not harness.connector._requests and not harness.connector._hints


def test_tool_names_from_clients_get_a_bounded_set_of_metric_labels(harness):
    """Each label is a Prometheus series for the server's lifetime."""
    harness.set_ttl(0)
    labels: set[str] = set()
    for i in range(100):
        harness.submit(f"t{i}", tokens(i, 40), ProgramHints(f"T{i}", 0, tool=f"tool{i}"))
        for _ in range(3):
            for outputs in harness.step().engine_outputs.values():
                stats = outputs.scheduler_stats.kv_connector_stats or {}
                labels |= set(stats.get("tool_ttl_s", {}))
    assert len(labels) == 65 and "other" in labels and "tool0" in labels
