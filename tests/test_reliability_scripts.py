"""The soak and chaos scripts' arguments, program client and output comparison, without an
engine: requests go to an in-process ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from continuum_tiered.lab import chaos, soak
from continuum_tiered.lab.reliability import Mismatch, compare_turns, log_problems


def test_soak_arguments():
    assert soak.parse_args([]).programs == 1000
    args = soak.parse_args(["--programs", "5", "--policy", "static-ttl", "--policy-option", "a=1"])
    assert args.programs == 5
    options = soak.serve_options(args, Path("/scratch"))
    assert options[:2] == ["--tiers", "cpu=2MiB,disk=/scratch:256MiB:cleanup"]
    assert options[2:] == ["--policy", "static-ttl", "--policy-option", "a=1"]
    assert soak.serve_options(soak.parse_args(["--no-tiers"]), Path("/scratch")) == []
    command = soak.replay_command(args, "http://127.0.0.1:1", Path("t.jsonl"))
    assert command[command.index("--programs") + 1] == "5"
    assert command[command.index("--policy-hints") + 1] == "on"
    for bad in (["--programs", "0"], ["--jps", "0"], ["--time-scale", "-1"]):
        with pytest.raises(SystemExit):
            soak.parse_args(bad)


def test_soak_trace_repeats_bfcl_under_new_ids():
    programs = soak.soak_trace(801, 2, seed=0)
    assert len({p.program_id for p in programs}) == 801
    assert programs[800].program_id.endswith("#1")
    assert programs[800].turns == programs[0].turns
    assert all(1 <= len(p.turns) <= 2 for p in programs)


def test_chaos_arguments():
    assert chaos.parse_args([]).scenarios == list(chaos.SCENARIOS)
    assert chaos.parse_args(["--scenarios", "control, disk-full"]).scenarios == [
        "control",
        "disk-full",
    ]
    for bad in (["--scenarios", "control,meteor"], ["--scenarios", ","], ["--turns", "0"]):
        with pytest.raises(SystemExit):
            chaos.parse_args(bad)


def test_compare_turns_finds_every_kind_of_difference():
    reference = {("s", "p", 0): [1, 2, 3], ("s", "p", 1): [4, 5], ("s", "p", 2): [6]}
    observed = {
        ("s", "p", 0): [1, 2, 3],  # same
        ("s", "p", 1): [4, 5, 9],  # longer
        ("s", "p", 2): [7],  # different token
        ("s", "q", 0): [1],  # no reference
    }
    result = compare_turns(observed, reference)
    assert (result.compared, result.missing_reference) == (3, 1)
    assert {m.key for m in result.mismatches} == {("s", "p", 1), ("s", "p", 2)}
    assert Mismatch(("k", "", 0), (1, 2, 3), (1, 2)).first_difference == 2
    assert Mismatch(("k", "", 0), (1, 2, 3), (1, 5, 3)).first_difference == 1


def test_log_problems_counts_repeats_together():
    lines = [
        "INFO 12-01 01:55:27 all good",
        "[2026-12-01 01:55:18] LMCache WARNING: Failed to allocate 131072 bytes",
        "[2026-12-01 01:55:19] LMCache WARNING: Failed to allocate 262144 bytes",
        "(EngineCore pid=7) ERROR 12-01 01:55:20 [core.py:12] boom 'req-1'",
    ]
    problems = log_problems(lines)
    assert sorted(problems.values()) == [1, 2]


def serve(handler):
    """An AsyncClient factory for ``chaos.run_programs``-style calls on a mock server."""
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=None)


RULES = chaos.RetryRules(request_timeout_s=0.2, retry_window_s=2.0, backoff_s=0.01)


def test_send_turn_retries_server_errors_not_client_errors():
    answers = iter([502, 503, 200])

    def flaky(request: httpx.Request) -> httpx.Response:
        status = next(answers)
        if status != 200:
            return httpx.Response(status, text="upstream gone")
        return httpx.Response(200, json={"choices": [{"token_ids": [7, 8]}]})

    async def go(handler):
        async with serve(handler) as client:
            return await chaos.send_turn(client, chaos.Route("http://x"), {}, {}, RULES, t0=0.0)

    output, attempts, error = asyncio.run(go(flaky))
    assert output == [7, 8] and error is None
    assert [a.status for a in attempts] == [502, 503, 200]

    output, attempts, error = asyncio.run(go(lambda r: httpx.Response(400, text="bad hint")))
    assert output is None and len(attempts) == 1 and "HTTP 400" in error


def test_send_turn_counts_an_unanswered_attempt_as_hung():
    async def silent(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    async def go():
        async with serve(silent) as client:
            rules = chaos.RetryRules(request_timeout_s=0.05, retry_window_s=0.1, backoff_s=0.01)
            return await chaos.send_turn(client, chaos.Route("http://x"), {}, {}, rules, t0=0.0)

    output, attempts, error = asyncio.run(go())
    assert output is None and error.startswith("timeout")
    assert attempts and all(a.hung for a in attempts)


@pytest.mark.parametrize("via_proxy", [False, True])
def test_program_prompts_extend_with_the_replies(via_proxy):
    seen: list[tuple[dict, httpx.Headers]] = []

    def echo(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((body, request.headers))
        return httpx.Response(200, json={"choices": [{"token_ids": [len(seen)] * 2}]})

    shape = chaos.ProgramShape(turns=3, first_tokens=5, new_tokens=2, output_tokens=2)
    shape = chaos.ProgramShape(**{**shape.__dict__, "pause_s": (0.0, 0.0)})

    async def go():
        async with serve(echo) as client:
            route = chaos.Route("http://x", via_proxy=via_proxy)
            return await chaos.run_program(client, route, "p7", 0.0, shape, RULES, 0, 0.0)

    result = asyncio.run(go())
    assert result.error is None and len(result.turns) == 3
    for k, turn in enumerate(result.turns[1:], 1):
        previous = result.turns[k - 1]
        assert turn.prompt[: len(previous.prompt) + 2] == previous.prompt + previous.output
        assert len(turn.prompt) == len(previous.prompt) + 2 + 2
    bodies = [body for body, _ in seen]
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 2 for b in bodies)
    if via_proxy:
        assert all("kv_transfer_params" not in b and "priority" not in b for b in bodies)
        assert [h.get("x-program-id") for _, h in seen] == ["p7"] * 3
        assert [h.get("x-program-last-turn") for _, h in seen] == [None, None, "true"]
    else:
        hints = [b["kv_transfer_params"]["continuum"] for b in bodies]
        assert [(h["turn"], h["last_turn"]) for h in hints] == [(0, False), (1, False), (2, True)]
        assert len({b["priority"] for b in bodies}) == 1

    prompts, outputs = chaos.completed_turns({"s": [result]})
    assert [t for t, _ in prompts[("s", "p7")]] == [0, 1, 2]
    assert outputs[("s", "p7", 2)] == [3, 3]


def test_completed_turns_skip_unanswered_ones_and_rows_count_them():
    ok = chaos.TurnResult([1], [2], [chaos.Attempt(0.0, 0.1, 200)])
    failed = chaos.TurnResult(
        [1, 2, 3],
        None,
        [chaos.Attempt(1.0, 0.2, 502, "HTTP 502"), chaos.Attempt(2, 60, None, "timeout: x")],
    )
    program = chaos.ProgramResult("p", [ok, failed], error="turn 1: timeout")
    prompts, outputs = chaos.completed_turns({"s": [program]})
    assert list(outputs) == [("s", "p", 0)] and prompts[("s", "p")] == [(0, [1])]
    scenario = chaos.Scenario("s", results=[program])
    row = chaos.scenario_row(scenario, compare_turns(outputs, outputs))
    assert (row.programs_ok, row.turns, row.compared, row.mismatches) == (0, 1, 1, 0)
    assert (row.errors, row.failed_turns, row.hung, row.max_latency_s) == (2, 1, 1, 60)
    assert "| s | 0/1 | 1 | 1 | 0 | 2 | 1 | 1 | 60.00 |" in chaos.format_table([row])


def test_proxy_notes_report_gateway_answers_and_slow_attempts_during_the_outage():
    attempts = [
        chaos.Attempt(1.0, 0.1, 200),
        chaos.Attempt(5.0, 0.01, 502, "HTTP 502"),  # down: a fast 502
        chaos.Attempt(6.0, 20.0, 200),  # down: held until the restart
        chaos.Attempt(30.0, 0.2, 200),  # after the restart
    ]
    program = chaos.ProgramResult("p", [chaos.TurnResult([1], [2], attempts)])
    attempts.append(chaos.Attempt(3.9, 0.2, 502, "HTTP 502"))  # in flight at the kill
    notes = chaos.proxy_notes([program], {"killed": 104.0, "ready": 125.0}, t0=100.0)
    assert notes[0] == "upstream down 4.0-25.0 s: 3 attempts, 2 answered [502] within 0.20 s"
    assert notes[1] == "1 in flight at the kill: 502"
    assert any("1 attempts during the outage took > 5 s (longest 20.0 s)" in n for n in notes)
    assert notes[-1] == "first 200 after the restart 5.00 s after it was ready"
    assert chaos.proxy_notes([program], {}, t0=0.0) == [
        "the upstream was never killed (the programs ended first)"
    ]


def test_rss_sampler_reads_the_series_at_fractions_of_the_run():
    from continuum_tiered.lab.reliability import RssSampler

    sampler = RssSampler(root_pid=-1)
    sampler.series = [(0.0, {"worker": 1}), (4.0, {"worker": 2}), (10.0, {"worker": 3, "api": 9})]
    assert sampler.at_fractions("worker", [0, 0.5, 1]) == [1, 2, 3]
    assert sampler.at_fractions("api", [0, 1]) == [9, 9]
    assert sampler.at_fractions("engine_core", [0]) == []
