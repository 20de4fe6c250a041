"""The clock and the lower tiers reach ``ContinuumConnector`` only through the ``TierLink``
bound to it (``bind_tiers``), in vLLM's real Scheduler and BlockPool."""

from __future__ import annotations

import time

import pytest
from vllm.v1.request import Request

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.core.ttl import TTLDecision
from continuum_tiered.policies.base import RetentionPolicy, TurnEnd
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.vllm.connectors.tier_link import NoTiers

TTL_S = 5.0


class FakeTiers:
    """A link with its own clock, one lower tier ("cpu"), and a record of offloads."""

    can_offload = True

    def __init__(self) -> None:
        self.t = 1_000.0  # far from the wall clock: a wall-clock reading would show
        self.offloaded: list[str] = []

    def now(self) -> float:
        return self.t

    def tier_after_release(self, request: Request) -> str | None:
        return "cpu"

    def offload(self, request: Request) -> None:
        self.offloaded.append(request.request_id)


class SwapAndPin(RetentionPolicy):
    """Pins for ``TTL_S`` and asks for a copy below whenever it may; notes each turn end."""

    name = "swap-and-pin"

    def __init__(self) -> None:
        self.turns: list[TurnEnd] = []

    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
        self.turns.append(turn)
        return TTLDecision(TTL_S, 0.0, "static", offload=turn.can_offload)


@pytest.fixture
def driver(tiny_model_dir) -> SchedulerDriver:
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=40,
        block_size=32,
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    d = SchedulerDriver(cfg, build_vllm_config(cfg))
    d.connector.policy = SwapAndPin()
    return d


def finish_turn(driver: SchedulerDriver, rid: str, arrival_s: float) -> None:
    hints = ProgramHints("A", 0, tool="grep").to_params()
    driver.add_request(rid, list(range(3, 323)), 2, arrival_s, kv_transfer_params=hints)
    for _ in range(50):
        if rid in driver.step().finished_request_ids:
            return
    raise AssertionError(f"{rid} did not finish")


def test_the_bound_links_clock_drives_the_pin_deadline(driver):
    link = FakeTiers()
    driver.connector.bind_tiers(link)
    finish_turn(driver, "a0", link.t)
    pin = driver.connector.pins.get("A")
    assert pin is not None and pin.deadline_s == link.t + TTL_S
    link.t += TTL_S - 0.5
    driver.step()
    assert driver.connector.pins.get("A") is not None
    link.t += 1.0
    driver.step()
    assert driver.connector.pins.get("A") is None
    assert driver.connector.pins.releases[ReleaseReason.EXPIRED] == 1


def test_the_links_tier_and_offload_reach_the_policy(driver):
    link = FakeTiers()
    driver.connector.bind_tiers(link)
    finish_turn(driver, "a0", link.t)
    (turn,) = driver.connector.policy.turns
    assert (turn.tier, turn.can_offload, turn.now_s) == ("cpu", True, link.t)
    assert link.offloaded == ["a0"]


def test_unbound_it_has_the_wall_clock_and_no_tier(driver):
    finish_turn(driver, "a0", time.time())
    (turn,) = driver.connector.policy.turns
    assert (turn.tier, turn.can_offload) == (None, False)
    assert turn.now_s == pytest.approx(time.time(), abs=60)


def test_the_link_is_bound_once(driver):
    driver.connector.bind_tiers(NoTiers(lambda: 0.0))
    with pytest.raises(RuntimeError, match="bound to its tiers already"):
        driver.connector.bind_tiers(FakeTiers())
