"""Program-level FCFS: vLLM's priority queue ordered by the program's first arrival."""

from __future__ import annotations

from continuum_tiered.client.agent_program import AgentProgram
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver


def test_a_turn_of_an_older_program_overtakes_an_earlier_request_of_a_newer_one(
    tiny_model_dir,
):
    driver = SchedulerDriver(
        DriverConfig(
            model_dir=tiny_model_dir, num_blocks=64, max_num_seqs=1, scheduling_policy="priority"
        )
    )
    old = AgentProgram("old", first_arrival_s=100.0)
    new = AgentProgram("new", first_arrival_s=200.0)
    driver.add_request("busy", list(range(3, 67)), 3, arrival_time=0.0, priority=0)
    driver.step()  # "busy" holds the only running slot
    driver.add_request("new-t0", list(range(3, 35)), 1, arrival_time=201.0, priority=new.priority)
    driver.add_request("old-t5", list(range(5, 37)), 1, arrival_time=250.0, priority=old.priority)
    admitted = []
    while len(admitted) < 2:
        out = driver.step().scheduler_output
        admitted += [r.req_id for r in out.scheduled_new_reqs]
    assert admitted == ["old-t5", "new-t0"]
