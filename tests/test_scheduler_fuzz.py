"""Stateful fuzz of ContinuumConnector in vLLM's real Scheduler and BlockPool (issue 18).

The state machine is ``continuum_tiered.sim.fuzz.SchedulerFuzz`` (its docstring lists the
rules and invariants); ``experiments/fuzz_scheduler.py`` runs it for 10,000 sequences.
Here a short derandomized run per retention-policy variant checks every invariant after
every rule and engine step; then one deterministic test per defect the fuzz found in the
connector before commit 7fe118e, each the fuzz's minimal failing sequence (the short run
does not reach them; the long one does).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from vllm.v1.request import RequestStatus

from continuum_tiered.sim.fuzz import (
    FuzzSetup,
    Variant,
    hints,
    new_driver,
    quiet_logs,
    steps,
    tokens,
)

SEQUENCES = 80  # per variant; each is at most RULES rules plus a drain
RULES = 20

# name -> (variant, whether it must pin). "tiered" is the connector's default config: the
# tiny model's estimated prefill is nearly free, so its cost model pins rarely; "-slow"
# variants price prefill at 0.5 s + 4 ms/token, so the cost models pin for seconds.
VARIANTS = {
    "tiered": (Variant(policy="tiered", profile="estimate"), False),
    "tiered-slow": (Variant(policy="tiered", profile="slow"), True),
    "continuum-slow": (Variant(policy="continuum", profile="slow"), True),
    "static-ttl": (Variant(policy="static-ttl"), True),
}


@pytest.fixture(scope="module")
def base_setup(tiny_model_dir) -> Iterator[FuzzSetup]:
    """The vLLM config, built once for the module (it takes seconds)."""
    with quiet_logs():
        yield FuzzSetup.build(tiny_model_dir, Variant())


def run_fuzz(setup: FuzzSetup, sequences: int = SEQUENCES) -> None:
    with quiet_logs():
        run_state_machine_as_test(
            setup.machine(),
            settings=settings(
                max_examples=sequences,
                stateful_step_count=RULES,
                derandomize=True,
                database=None,
                deadline=None,
                # Shrinking a failure here can take minutes; run experiments/fuzz_scheduler.py
                # for the minimal sequence.
                phases=[Phase.explicit, Phase.generate],
                report_multiple_bugs=False,
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            ),
        )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fuzz_holds_every_invariant(base_setup, name):
    variant, must_pin = VARIANTS[name]
    setup = base_setup.derive(variant)
    run_fuzz(setup)
    stats = setup.stats
    # Or the fuzz would prove nothing: the sequences pinned, handed pins over to the next
    # turn, released them under pressure and at expiry, preempted, aborted and reset.
    assert stats.sequences >= SEQUENCES, stats.summary()
    assert stats.preemptions > 0 and stats.aborts > 0 and stats.resets_ok > 0, stats.summary()
    if must_pin:
        assert stats.sequences_with_pins >= SEQUENCES // 4, stats.summary()
        assert stats.pin_handovers > 0 and stats.pinned_prefix_hit_tokens > 0, stats.summary()
        assert stats.pressure_releases > 0 and stats.expirations > 0, stats.summary()


# ---------------------------------------------------------------------------------------
# Defects the fuzz found before 7fe118e, one minimal sequence each.


@pytest.fixture
def tiered(base_setup):
    """The default policy with a prefill cost that makes its cost model pin (TTL ~0.6 s
    for a 320-token turn, ~1.5 s for 1,000 tokens)."""
    return new_driver(base_setup.derive(Variant(policy="tiered")), 40, ttl_s=0.0)


def assert_pins_expire_and_nothing_leaks(driver, clock) -> None:
    """Every pin goes once its deadline passed and nothing of its program waits."""
    clock.now += 3600.0
    steps(driver, clock, 1)
    pool = driver.block_pool
    assert len(driver.connector.pins) == 0
    assert pool.get_num_free_blocks() == len(pool.blocks) - 1
    assert all(b.ref_cnt == 0 for b in pool.blocks[1:])


def finish(driver, clock, request, max_steps: int = 50) -> None:
    for _ in range(max_steps):
        if request.is_finished():
            return
        steps(driver, clock, 1)
    raise AssertionError(
        f"{request.request_id} not finished after {max_steps} steps: {request.status.name}, "
        f"{driver.block_pool.get_num_free_blocks()} blocks free, "
        f"pins {[(p.program_id, p.num_blocks) for p in driver.connector.pins]}"
    )


def test_prefix_cache_reset_succeeds_when_only_pins_hold_blocks(tiered):
    d, clock = tiered
    a0 = d.add_request("A-0", tokens(1, 320), 2, clock.now, kv_transfer_params=hints("A", 0))
    finish(d, clock, a0)
    assert len(d.connector.pins) == 1  # the turn is pinned, nothing runs
    assert d.scheduler.reset_prefix_cache()
    assert len(d.connector.pins) == 0
    assert d.block_pool.get_num_free_blocks() == len(d.block_pool.blocks) - 1
    assert_pins_expire_and_nothing_leaks(d, clock)


def test_prefix_cache_reset_that_preempts_running_requests_does_not_raise(tiered):
    d, clock = tiered
    a0 = d.add_request("A-0", tokens(1, 320), 2, clock.now, kv_transfer_params=hints("A", 0))
    finish(d, clock, a0)
    b0 = d.add_request("B-0", tokens(2, 100), 40, clock.now, kv_transfer_params=hints("B", 0))
    steps(d, clock, 1)
    assert b0.status == RequestStatus.RUNNING
    # vLLM raises RuntimeError when the reset fails after it preempted every running request.
    assert d.scheduler.reset_prefix_cache(reset_running_requests=True)
    assert len(d.connector.pins) == 0
    finish(d, clock, b0)
    assert_pins_expire_and_nothing_leaks(d, clock)


def test_compacted_next_turn_is_admitted_past_its_own_programs_pin(tiered):
    d, clock = tiered
    # Turn 0 fills 31 of the 39 usable blocks; its pin keeps them.
    a0 = d.add_request("A-0", tokens(1, 1000), 1, clock.now, kv_transfer_params=hints("A", 0))
    finish(d, clock, a0)
    assert d.connector.pins.get("A").num_blocks == 31
    # The next turn compacts its context (shares nothing) and needs 10 blocks; 8 are free.
    a1 = d.add_request("A-1", tokens(2, 300), 1, clock.now, kv_transfer_params=hints("A", 1))
    finish(d, clock, a1)
    assert_pins_expire_and_nothing_leaks(d, clock)


def test_waiting_turn_gets_room_from_other_programs_pins(tiered):
    d, clock = tiered
    a0 = d.add_request("A-0", tokens(1, 640), 1, clock.now, kv_transfer_params=hints("A", 0))
    finish(d, clock, a0)
    b0 = d.add_request("B-0", tokens(2, 480), 1, clock.now, kv_transfer_params=hints("B", 0))
    finish(d, clock, b0)
    assert d.block_pool.get_num_free_blocks() == 4  # pins: A 20 blocks, B 15 blocks
    # A's next turn diverges (10 blocks, nothing shared): releasing B's pin would admit it.
    a1 = d.add_request("A-1", tokens(3, 320), 1, clock.now, kv_transfer_params=hints("A", 1))
    finish(d, clock, a1, max_steps=5)
    assert_pins_expire_and_nothing_leaks(d, clock)
