"""A running request that preempts itself, on vLLM's real Scheduler with the connector.

Under ``--scheduling-policy priority`` vLLM preempts the running request with the largest
``(priority, arrival_time)`` when another cannot grow. When that is the request asking, it
preempts itself. vLLM 0.32 then ends the step's running loop (``break``); 0.33 goes on to
the running requests after it (``continue``, ``vllm/v1/core/sched/scheduler.py``: "The
request was the lowest-priority running request and preempted itself"). Under both, with
ContinuumConnector and program-FCFS priorities: the pin gives way first, every request
finishes, admissions from the waiting queue keep program FCFS order, and every block
returns to the pool.

Scenario (32-token blocks, 16 usable, at most two running): program Z's first turn leaves
a pin; B's turn (a newer program) is admitted, then A's (an older one) one step later, so
``running`` is ``[B, A]``. Both grow until the pool is full: Z's pin is released under
pressure, then B, one token ahead, needs a block first and, as the lowest-priority running
request, preempts itself. D and C (older programs than B) wait meanwhile and must be
admitted before B resumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import vllm
from vllm.v1.request import Request, RequestStatus

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.policies.static_ttl import StaticTTLPolicy
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver
from continuum_tiered.vllm.connectors.tier_link import NoTiers

BLOCK = 32
NUM_BLOCKS = 17  # 16 usable: block 0 is vLLM's null block
# vLLM 0.33 keeps scheduling the running requests behind one that preempted itself.
CONTINUES_AFTER_SELF_PREEMPTION = tuple(int(p) for p in vllm.__version__.split(".")[:2]) >= (
    0,
    33,
)
WAITING = (RequestStatus.WAITING, RequestStatus.PREEMPTED)

# program -> priority (its first arrival in ms: smaller is older and goes first)
PRIORITY = {"D": 50, "A": 100, "C": 150, "B": 200, "Z": 300}


def tokens(seed: int, n: int) -> list[int]:
    """Distinct prompts: no two share a prefix block."""
    return [3 + (seed * 7919 + i * 31) % 490 for i in range(n)]


@dataclass
class Run:
    driver: SchedulerDriver
    now: float = 1_000.0
    requests: dict[str, Request] = field(default_factory=dict)
    admitted: list[str] = field(default_factory=list)  # from the waiting queue, in order

    def __post_init__(self) -> None:
        self.driver.connector.bind_tiers(NoTiers(lambda: self.now))
        self.driver.connector.policy = StaticTTLPolicy(100.0)
        self.initial_free = self.driver.block_pool.get_num_free_blocks()

    def submit(self, rid: str, prompt_len: int, max_tokens: int, last_turn: bool) -> None:
        program = rid[0].upper()
        hints = ProgramHints(program, int(rid[1:]), last_turn=last_turn, tool="pytest")
        self.requests[rid] = self.driver.add_request(
            rid,
            tokens(ord(program) * 10 + int(rid[1:]), prompt_len),
            max_tokens,
            arrival_time=self.now,
            priority=PRIORITY[program],
            kv_transfer_params=hints.to_params(),
        )

    def key(self, rid: str) -> tuple[int, float]:
        request = self.requests[rid]
        return request.priority, request.arrival_time

    def step(self) -> dict[str, int]:
        """One engine step; checks program FCFS on the admissions it made and returns the
        tokens scheduled per request."""
        waiting = {r for r, q in self.requests.items() if q.status in WAITING}
        out = self.driver.step().scheduler_output
        self.now += 0.01
        # vLLM takes them from its priority queue in this order within a step.
        new = [r.req_id for r in out.scheduled_new_reqs]
        admitted = sorted([*new, *out.scheduled_cached_reqs.resumed_req_ids], key=self.key)
        left = {r for r in waiting if self.requests[r].status in WAITING}
        for rid in admitted:
            assert all(self.key(rid) <= self.key(r) for r in left), (rid, sorted(left))
        self.admitted += admitted
        return dict(out.num_scheduled_tokens)

    def run_until(self, done: Callable[[], bool], max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if done():
                return
            self.step()
        raise AssertionError("deadlock: " + str({r: q.status for r, q in self.requests.items()}))

    def finished(self, *rids: str) -> bool:
        return all(self.requests[r].is_finished() for r in rids)


@pytest.fixture
def run(tiny_model_dir) -> Iterator[Run]:
    cfg = DriverConfig(
        model_dir=tiny_model_dir,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK,
        max_num_seqs=2,
        scheduling_policy="priority",
        kv_transfer_config={"kv_connector": "ContinuumConnector", "kv_role": "kv_both"},
    )
    yield Run(SchedulerDriver(cfg))


def test_running_request_preempting_itself_keeps_fcfs_and_leaks_nothing(run: Run) -> None:
    connector, pool = run.driver.connector, run.driver.block_pool
    run.submit("z0", 64, 2, last_turn=False)
    run.run_until(lambda: run.finished("z0"))
    assert connector.pins.get("Z") is not None  # 2 blocks pinned during Z's tool call

    run.submit("b0", 96, 200, last_turn=True)  # grows to 296 tokens: 10 blocks
    run.step()
    run.submit("a0", 96, 200, last_turn=False)  # its pin must give way to B
    run.step()
    b0, a0 = run.requests["b0"], run.requests["a0"]
    assert run.driver.scheduler.running == [b0, a0]
    run.submit("c0", 64, 4, last_turn=True)  # wait: both running slots are taken
    run.submit("d0", 64, 4, last_turn=True)

    while b0.status == RequestStatus.RUNNING:
        pins_before = len(connector.pins)
        scheduled = run.step()
        assert not run.finished("b0", "a0"), "the pool never ran out"
    assert b0.status == RequestStatus.PREEMPTED and b0.num_preemptions == 1
    # The pin went first, under pressure; only then did vLLM preempt.
    assert pins_before == 0 and connector.pins.releases[ReleaseReason.PRESSURE] == 1
    assert a0.status == RequestStatus.RUNNING and a0.num_preemptions == 0
    assert "b0" not in scheduled
    # 0.32 ends the running loop at the self-preemption, 0.33 schedules A in the same step.
    assert ("a0" in scheduled) == CONTINUES_AFTER_SELF_PREEMPTION

    run.submit("z1", 32, 2, last_turn=True)
    run.run_until(lambda: run.finished("a0", "b0", "c0", "d0", "z1"))
    assert b0.num_preemptions == 1 and a0.num_preemptions == 0
    # A's finished turn was pinned; B's resumption needed those blocks, so the pin gave way.
    assert connector.pins.releases[ReleaseReason.PRESSURE] == 2
    assert len(b0.output_token_ids) == 200 and len(a0.output_token_ids) == 200
    # Program FCFS: the older programs D and C go before B resumes; Z's last turn, the
    # newest program, after all of them.
    assert run.admitted == ["z0", "b0", "a0", "d0", "c0", "b0", "z1"]

    # No leak: once every deadline has passed, no pin and no held block is left.
    run.now += 1e6
    run.step()
    assert len(connector.pins) == 0
    assert pool.get_num_free_blocks() == run.initial_free
    assert all(b.ref_cnt == 0 for b in pool.blocks[1:])
