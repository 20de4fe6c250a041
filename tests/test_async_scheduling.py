"""vLLM's AsyncScheduler in the scheduler driver and the virtual-time replay.

The CUDA build schedules step k while step k-1 runs (docs/architecture.md,
'Async scheduling'). These tests run
vLLM's real AsyncScheduler with the batch queue of the engine core, and check what a
connector sees: a finished request's blocks come back to the free queue one step later.
"""

from __future__ import annotations

import pytest

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.sim.peers import PEERS
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.sim.simulate import ReplaySetup, replay
from continuum_tiered.traces.model import TraceProgram, Turn

BLOCK = 32


NO_PINS = {"policy": "none"}
PIN_EVERY_TURN = {"policy": "static-ttl", "policy_options": {"ttl_s": 600.0}}


def _driver(tiny_model_dir, async_scheduling: bool, connector=NO_PINS) -> SchedulerDriver:
    """64 blocks of 32 tokens, our connector configured by ``connector``."""
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=64,
        block_size=BLOCK,
        kv_transfer_config={
            "kv_connector": "ContinuumConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": connector,
        },
        async_scheduling=async_scheduling,
    )
    return SchedulerDriver(cfg, build_vllm_config(cfg))


def _free_blocks_after_each_step(driver: SchedulerDriver) -> tuple[list[int], int]:
    """One 96-token request whose third token ends it (a stop token, as a model's end of
    turn, which the scheduler cannot see coming): free blocks after every step, and the
    step whose output reported it finished."""
    driver.add_request("r", list(range(3, 99)), max_tokens=8, arrival_time=0.0, stop_token_id=2)

    def next_token(request) -> int:
        return 2 if len(request.output_token_ids) == 2 else 7

    free, finished_at = [], None
    for k in range(8):
        result = driver.step(next_token)
        free.append(driver.block_pool.get_num_free_blocks())
        if "r" in result.finished_request_ids:
            finished_at = k
    assert finished_at is not None
    return free, finished_at


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_finishes_and_frees_all_its_blocks(tiny_model_dir, async_scheduling):
    driver = _driver(tiny_model_dir, async_scheduling)
    free, _ = _free_blocks_after_each_step(driver)
    assert free[-1] == 64 - 1  # every block back, less the null block
    assert not driver.scheduler.requests and driver.steps_in_flight <= 1


def test_async_sees_a_finish_one_step_later_and_frees_its_blocks_one_step_after(tiny_model_dir):
    """Sync: the step that samples the last token reports the finish, and the blocks are
    free right after it. Async: its output is processed after the next step is scheduled
    (one step later), and with a KV consumer connector vLLM then defers the free behind
    the fence of the step in flight."""
    sync_free, sync_done = _free_blocks_after_each_step(_driver(tiny_model_dir, False))
    async_free, async_done = _free_blocks_after_each_step(_driver(tiny_model_dir, True))
    assert async_done == sync_done + 1
    assert sync_free[sync_done] == 63
    assert async_free[async_done] < 63  # held behind the deferred-free fence
    assert async_free[async_done + 1] == 63


def test_the_replay_runs_the_async_engine_with_the_same_step_times(tmp_path):
    """A program alone: the async engine overlaps scheduling with the forward pass, which
    the replay does not charge, so its turns take the sync engine's time."""
    programs = [
        TraceProgram("p", (Turn(320, 4, "grep", 1.0), Turn(400, 4, None, 0.0)), arrival_s=0.0)
    ]
    results = {}
    for async_scheduling in (False, True):
        setup = ReplaySetup(Deployment(async_scheduling=async_scheduling), None)
        summary, (run,) = replay(PEERS["tiered+pins"], programs, setup, 1)
        results[async_scheduling] = (run.jct_s, run.hit_tokens, summary.prefix_hit_ratio)
    assert results[True] == pytest.approx(results[False])
    assert Deployment(async_scheduling=True).async_scheduling is True


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_blocks_behind_the_fence_count_as_free_so_a_pin_is_kept(tiny_model_dir, async_scheduling):
    """A's turn is pinned (10 blocks). R (21 blocks) ends on a stop token; W (40 blocks)
    arrives right then. Sync: R's blocks are free, W fits beside A's pin. Async: R's blocks
    wait behind vLLM's fence for one step, so only 32 look free; counting them as coming
    back, the connector keeps A's pin and W is admitted a step later instead."""
    driver = _driver(tiny_model_dir, async_scheduling, PIN_EVERY_TURN)
    hints = ProgramHints("A", 0, False, "grep").to_params()
    driver.add_request("A0", list(range(3, 323)), 1, 0.0, kv_transfer_params=hints)
    driver.add_request("R", list(range(1000, 1640)), 8, 0.0, stop_token_id=2)

    def next_token(request) -> int:
        return 2 if request.request_id == "R" and len(request.output_token_ids) == 2 else 7

    admitted_at = None
    for k in range(12):
        result = driver.step(next_token)
        if "R" in result.finished_request_ids:
            assert driver.connector.pins.get("A") is not None
            driver.add_request("W", list(range(5000, 6280)), 1, 0.0)
            finished_step = k
        if result.prefix_hit_tokens("W") is not None:
            admitted_at = k
            break
    assert admitted_at is not None
    assert driver.connector.pins.get("A") is not None  # the pin survived W's admission
    assert admitted_at == finished_step + (2 if async_scheduling else 1)
