"""Stateful fuzz of ContinuumConnector in vLLM's real Scheduler and BlockPool (issue 18).

The state machine is ``continuum_tiered.lab.scheduler_fuzz.SchedulerFuzz`` (its docstring lists the
rules and invariants); ``experiments/fuzz_scheduler.py`` runs it for 10,000 sequences.
Here a short derandomized run per retention-policy variant checks every invariant after
every rule and engine step. Then one deterministic test per defect the long run found in
the connector of 1e0cb61 (each the minimal failing sequence the fuzz printed, tidied):
all five failed there, and pass since 7fe118e fixed the connector.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test
from vllm.v1.request import RequestStatus

from continuum_tiered.lab.scheduler_fuzz import (
    STEP_S,
    FuzzSetup,
    Variant,
    hints,
    new_driver,
    quiet_logs,
    steps,
    tokens,
)

RULES = 20  # per sequence, at most, plus a drain at teardown

# name -> (variant, sequences, whether it must pin). "tiered-slow" is the default policy
# with prefill priced at 0.5 s + 4 ms/token, so its cost model pins for seconds; it gets
# the most sequences (enough to hit the commonest defect of 1e0cb61, the failing reset).
# "tiered" is the connector's default config as is: the tiny model's estimated prefill is
# nearly free, so its cost model pins rarely.
VARIANTS = {
    "tiered-slow": (Variant(policy="tiered", profile="slow"), 200, True),
    "tiered": (Variant(policy="tiered", profile="estimate"), 50, False),
    "continuum-slow": (Variant(policy="continuum", profile="slow"), 50, True),
    "static-ttl": (Variant(policy="static-ttl"), 50, True),
}


@pytest.fixture(scope="module")
def base_setup(tiny_model_dir) -> Iterator[FuzzSetup]:
    """The vLLM config, built once for the module (it takes seconds)."""
    with quiet_logs():
        yield FuzzSetup.build(tiny_model_dir, Variant())


def run_fuzz(setup: FuzzSetup, sequences: int) -> None:
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


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fuzz_holds_every_invariant(base_setup, name):
    variant, sequences, must_pin = VARIANTS[name]
    setup = base_setup.derive(variant)
    run_fuzz(setup, sequences)
    stats = setup.stats
    # Or the fuzz would prove nothing: the sequences pinned, handed pins over to the next
    # turn, released them under pressure and at expiry, preempted, aborted and reset.
    assert stats.sequences >= sequences, stats.summary()
    assert stats.preemptions > 0 and stats.aborts > 0 and stats.resets_ok > 0, stats.summary()
    if must_pin:
        assert stats.sequences_with_pins >= sequences // 4, stats.summary()
        assert stats.pin_handovers > 0 and stats.pinned_prefix_hit_tokens > 0, stats.summary()
        assert stats.pressure_releases > 0 and stats.expirations > 0, stats.summary()


# ---------------------------------------------------------------------------------------
# Defects the fuzz found in the connector of 1e0cb61, one minimal sequence each.


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


def test_running_request_grows_before_a_newcomer_takes_the_freed_blocks(tiered):
    d, clock = tiered
    a0 = d.add_request("A-0", tokens(1, 320), 1, clock.now, kv_transfer_params=hints("A", 0))
    finish(d, clock, a0)
    assert d.block_pool.get_num_free_blocks() == 29  # A's pin holds 10 blocks
    r = d.add_request("R", tokens(2, 928), 8, clock.now)  # 29 blocks: all the rest
    steps(d, clock, 2)
    assert r.num_computed_tokens == 928  # R's next token needs a 30th block: A's pin's
    # (1e0cb61 kept the pin until then; 7fe118e releases it at the end of this step).
    w = d.add_request("W", tokens(3, 64), 1, clock.now)
    out = d.step().scheduler_output
    clock.now += STEP_S
    # 1e0cb61: has_pending_block_frees released the pin and left R out of the step, and
    # the freed blocks went to W. vLLM alone would never skip a running request.
    assert "R" in out.num_scheduled_tokens, dict(out.num_scheduled_tokens)
    finish(d, clock, r)
    finish(d, clock, w)
    assert_pins_expire_and_nothing_leaks(d, clock)
