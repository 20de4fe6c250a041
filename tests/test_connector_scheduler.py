"""ContinuumConnector inside vLLM's real Scheduler and BlockPool, driven without a model.

The forward pass is replaced by a fixed token per step (``SchedulerDriver``); block
allocation, prefix caching, admission and preemption are vLLM's own code.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from vllm.v1.request import RequestStatus

from continuum_tiered.hints import ProgramHints
from continuum_tiered.pins import ReleaseReason
from continuum_tiered.policies.static_ttl import NoRetentionPolicy, StaticTTLPolicy
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config

BLOCK = 32
NUM_BLOCKS = 40  # 39 usable: block 0 is vLLM's null block


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
        driver.connector.clock = self.clock
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
        self.connector.pins.release_all(ReleaseReason.SHUTDOWN)
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
