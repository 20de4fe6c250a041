"""Unmodified agents get program identity from their conversation (issue 19).

One ``continuum-tiered serve`` (CPU build, tiny random model, pins kept for 600 s) and
the proxy in front of it, for the module. The agents are the packages from the index,
unmodified, run in their own environment (``.venv/agents``, made by scripts/bootstrap.sh):
mini-swe-agent through the proxy, smolagents against the server alone (its middleware).
Neither sends a program id; each agent's turns must still form one program, which the
connector shows: every turn but the first takes over the pin the previous turn left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_proxy import RunningProxy

from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
)
from continuum_tiered.replay.runner import RunnerOptions, run_programs
from continuum_tiered.traces.swebench import SwebenchOptions, load_swebench

NUM_BLOCKS = 160
AGENTS_PYTHON = Path(sys.prefix) / "agents" / "bin" / "python"
DRIVERS = Path(__file__).parent / "agents"
TURNS = 4
PINS_CREATED = "vllm:continuum_pins_created_total"
HANDOVERS = "vllm:continuum_pin_handovers_total"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("agents") / "server.log"
    command = plugin_server_command(
        tiny_model_dir, NUM_BLOCKS, "--policy", "static-ttl", "--policy-option", "ttl_s=600"
    )
    with ServerProcess(command, log) as process:
        yield process


@pytest.fixture(scope="module")
def proxy(server: ServerProcess) -> Iterator[RunningProxy]:
    with RunningProxy.running(server.url) as running:
        yield running


def run_agent(driver: str, base_url: str, task: str) -> subprocess.Popen[str]:
    assert AGENTS_PYTHON.exists(), f"{AGENTS_PYTHON} is missing: run scripts/bootstrap.sh"
    # LiteLLM would try to fetch its price list from the network first.
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    return subprocess.Popen(
        [str(AGENTS_PYTHON), str(DRIVERS / driver), f"{base_url}/v1", task, str(TURNS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finished(agent: subprocess.Popen[str]) -> dict[str, object]:
    out, err = agent.communicate(timeout=600)
    assert agent.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def counters(url: str) -> dict[str, float]:
    samples = prometheus_samples(url)
    return {name: samples.get(name, 0.0) for name in (PINS_CREATED, HANDOVERS)}


def test_two_mini_swe_agents_through_the_proxy_are_two_programs(server, proxy):
    """Same task, started together: identical first turns, kept apart because each
    conversation has a request in flight until its reply comes back."""
    before = counters(server.url)
    sent_before = len(proxy.sent)
    agents = [run_agent("run_mini_swe_agent.py", proxy.url, "Fix the bug") for _ in range(2)]
    results = [finished(agent) for agent in agents]
    assert all(r["model_calls"] == TURNS for r in results)
    turns: dict[str, list[int]] = defaultdict(list)
    for body in proxy.sent[sent_before:]:
        hints = body["kv_transfer_params"]["continuum"]
        turns[hints["program_id"]].append(hints["turn"])
    assert sorted(sorted(t) for t in turns.values()) == [list(range(TURNS))] * 2
    after = counters(server.url)
    assert after[HANDOVERS] - before[HANDOVERS] == 2 * (TURNS - 1)


def test_smolagents_against_the_server_alone_is_one_program(server):
    """No proxy: ``continuum-tiered serve``'s middleware finds the program. The agent's
    last call (a final answer once its steps run out) is a new conversation of its own."""
    before = counters(server.url)
    result = finished(run_agent("run_smolagents.py", server.url, "Add the numbers 1 and 2"))
    assert result["steps"] >= TURNS
    after = counters(server.url)
    assert after[HANDOVERS] - before[HANDOVERS] == TURNS - 1
    assert after[PINS_CREATED] - before[PINS_CREATED] == TURNS + 1


def test_swebench_programs_replayed_without_ids_are_recovered_exactly(proxy):
    """The replay's programs, every id removed (no hints, no routing header): the proxy's
    grouping of requests into programs is the trace's."""
    options = SwebenchOptions(token_scale=0.02, max_turns=3, seed=0)
    programs = [
        dataclasses.replace(program, arrival_s=0.3 * i, turns=tuple(
            dataclasses.replace(t, tool_duration_s=min(t.tool_duration_s, 0.2))
            for t in program.turns
        ))
        for i, program in enumerate(load_swebench(options=options, limit=6))
    ]  # fmt: skip
    anonymous = RunnerOptions(model="tiny", send_hints=False, send_routing_key=False)
    sent_before = len(proxy.sent)
    records = asyncio.run(run_programs(proxy.url, programs, anonymous))
    assert all(r.error is None for r in records), [r.error for r in records]
    # A trace program's requests all start with the same tokens (its own random context).
    starts: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for body in proxy.sent[sent_before:]:
        program_id = body["kv_transfer_params"]["continuum"]["program_id"]
        starts[program_id].append(tuple(body["prompt"][:8]))
    assert all(len(set(s)) == 1 for s in starts.values())  # no program holds two
    assert len({s[0] for s in starts.values()}) == len(starts) == len(programs)  # none split
    assert sorted(len(s) for s in starts.values()) == sorted(len(p.turns) for p in programs)
