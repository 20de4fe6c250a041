"""Trace loaders (SWE-bench, mini-swe-agent, BFCL), trace validation, arrivals, CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from continuum_tiered.cli import main
from continuum_tiered.traces.arrivals import (
    MINISWE_RAW,
    SHARED_TRACES,
    SWEBENCH_FULL,
    load_named_trace,
    with_poisson_arrivals,
)
from continuum_tiered.traces.bfcl import FINAL_ANSWER_TOKENS, LognormalDurations, task_calls
from continuum_tiered.traces.build import BuildOptions, Call
from continuum_tiered.traces.miniswe import load_miniswe, trajectory_calls
from continuum_tiered.traces.model import (
    TraceError,
    TraceProgram,
    program_from_json,
    read_trace,
    write_trace,
)
from continuum_tiered.traces.swebench import load_swebench

TRAJ = MINISWE_RAW / "django__django-11163.traj.json"


@pytest.fixture
def shared_traces() -> Path:
    """The data these tests check against lives in ../shared/traces beside the repository
    (CI clones it there); without it, fail saying so rather than with a file error."""
    assert SHARED_TRACES.is_dir(), f"{SHARED_TRACES} is missing: clone beside ../shared"
    return SHARED_TRACES


def assert_valid(programs: list[TraceProgram]) -> None:
    """Every program passes the format's checks, prefix extension included."""
    for p in programs:
        assert program_from_json(json.loads(json.dumps(p.to_json()))) == p


# mini-swe-agent trajectories


def test_trajectories_convert_one_turn_per_assistant_message(shared_traces: Path) -> None:
    programs = load_miniswe([MINISWE_RAW])
    assert [p.program_id for p in programs] == [
        "django__django-11163",
        "django__django-16255",
        "django__django-16429",
    ]
    for program in programs:
        data = json.loads((MINISWE_RAW / f"{program.program_id}.traj.json").read_text())
        assistant = [m for m in data["messages"] if m["role"] == "assistant"]
        assert len(program.turns) == len(assistant) == data["info"]["model_stats"]["api_calls"]
    assert_valid(programs)


def test_trajectory_tokens_and_tools_checked_by_hand(shared_traces: Path) -> None:
    (program,) = load_miniswe([TRAJ])
    turns = program.turns
    # Call 0: "ls -R | grep ... && grep -r ...", usage 1397 prompt / 219 completion.
    assert (turns[0].prompt_tokens, turns[0].output_tokens, turns[0].tool) == (1397, 219, "ls")
    # Call 3 runs "python3 reproduce_issue.py"; call 11 removes it with rm.
    assert turns[3].tool == "python3"
    assert turns[11].tool == "rm"
    # The last call is the submission ("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && ...").
    assert turns[-1].tool is None
    assert turns[-1].tool_duration_s == 0.0


def test_trajectories_match_the_compact_swebench_file(shared_traces: Path) -> None:
    """Raw and compact files of the same runs give the same programs, durations included."""
    compact = {p.program_id: p for p in load_swebench(SWEBENCH_FULL)}
    for program in load_miniswe([MINISWE_RAW]):
        assert program == compact[program.program_id]


def test_trajectory_without_usage_estimates_four_chars_per_token(shared_traces: Path) -> None:
    data = json.loads(TRAJ.read_text())
    for message in data["messages"]:
        message.pop("extra", None)
    data["messages"][1]["content"] = [{"type": "text", "text": data["messages"][1]["content"]}]
    calls = trajectory_calls(data, "t")
    prompt_chars = len(data["messages"][0]["content"]) + len(
        data["messages"][1]["content"][0]["text"]
    )
    reply_chars = len(data["messages"][2]["content"])
    assert calls[0] == Call(math.ceil(prompt_chars / 4), math.ceil(reply_chars / 4), "ls")
    assert all(b.prompt_tokens > a.prompt_tokens for a, b in itertools.pairwise(calls))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"messages": "x"}, "field messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"trajectory_format": "other", "messages": []}, "field trajectory_format"),
        ({"messages": [{"role": "assistant", "content": 3}]}, r"messages\[0\]\.content"),
    ],
)
def test_bad_trajectories_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(TraceError, match=field):
        trajectory_calls(data, "t.traj.json")


# BFCL


def test_bfcl_calls_per_turn() -> None:
    programs = {p.program_id: p for p in load_named_trace("bfcl")}
    assert len(programs) == 800
    # multi_turn_base_0's ground truth: [cd, mkdir, mv], [cd, grep], [sort], [cd, mv, cd, diff].
    tools = [t.tool for t in programs["multi_turn_base_0"].turns]
    assert tools == [
        *("cd", "mkdir", "mv", None),
        *("cd", "grep", None),
        *("sort", None),
        *("cd", "mv", "cd", "diff", None),
    ]
    # multi_turn_miss_func_0: "sort" is missing in turn 2 (answer only) and added in turn 3.
    tools = [t.tool for t in programs["multi_turn_miss_func_0"].turns]
    assert tools[6:10] == [None, None, "sort", None]
    # multi_turn_base_1: [ls], [cd, mv], [cd, grep], [tail].
    assert len(programs["multi_turn_base_1"].turns) == 2 + 3 + 3 + 2
    assert_valid(list(programs.values()))


def test_bfcl_prompt_arithmetic() -> None:
    docs = [
        {"name": "cd", "response": {"type": "dict"}},
        {"name": "sort", "response": {"type": "dict", "properties": {}}},
    ]
    task = {
        "id": "t",
        "involved_classes": ["FS"],
        "question": [[{"role": "user", "content": "u" * 40}], []],
        "missed_function": {"1": ["sort"]},
    }
    calls = task_calls(
        task, [["cd(folder='a')"], ["sort(file_name='x')"]], {"FS": docs}.__getitem__
    )

    def tokens(value: object) -> int:
        return math.ceil(len(value if isinstance(value, str) else json.dumps(value)) / 4)

    first = tokens([docs[0]]) + 10  # offered docs, then the user message
    answer1 = first + tokens("cd(folder='a')") + tokens(docs[0]["response"])
    second = answer1 + FINAL_ANSWER_TOKENS + tokens([docs[1]])  # sort's docs arrive
    assert calls == [
        Call(first, tokens("cd(folder='a')"), "cd"),
        Call(answer1, FINAL_ANSWER_TOKENS, None),
        Call(second, tokens("sort(file_name='x')"), "sort"),
        Call(second + tokens("sort(file_name='x')") + tokens(docs[1]["response"]), 32, None),
    ]


def test_bfcl_bad_ground_truth_is_rejected() -> None:
    task = {"id": "t", "involved_classes": [], "question": [[{"role": "user", "content": "hi"}]]}
    with pytest.raises(TraceError, match="not a function call"):
        task_calls(task, [["42"]], {}.__getitem__)
    with pytest.raises(TraceError, match="1 user turns, 2 answers"):
        task_calls(task, [[], []], {}.__getitem__)
    with pytest.raises(TraceError, match="'Nope'"):
        task_calls({**task, "involved_classes": ["Nope"]}, [[]], {}.__getitem__)


def test_lognormal_durations_have_the_reported_mean_and_std() -> None:
    rng, durations = random.Random(0), LognormalDurations()
    samples = [durations.sample("cd", rng) for _ in range(200_000)]
    assert statistics.fmean(samples) == pytest.approx(1.923, rel=0.02)
    assert statistics.pstdev(samples) == pytest.approx(2.133, rel=0.05)
    assert durations.sample(None, rng) == 0.0


# Validation of trace files


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not JSON"),
        (
            '{"program_id": "p", "turns": [{"output_tokens": 3}]}',
            r"line 2 field turns\[0\]\.prompt_tokens: integer >= 1, got None",
        ),
        (
            '{"turns": [{"prompt_tokens": 5, "output_tokens": 3}]}',
            r"line 2 field program_id",
        ),
        (
            '{"program_id": "p", "turns": [{"prompt_tokens": 5, "output_tokens": 3, '
            '"tool": "ls", "tool_duration_s": -1}]}',
            r"line 2 field turns\[0\]\.tool_duration_s: number >= 0, got -1",
        ),
        (
            '{"program_id": "p", "turns": [{"prompt_tokens": 5, "output_tokens": 3}, '
            '{"prompt_tokens": 7, "output_tokens": 1}]}',
            r"line 2 field turns\[1\]\.prompt_tokens: 7 does not extend .* \(8 tokens\)",
        ),
    ],
)
def test_invalid_traces_name_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    good = '{"program_id": "ok", "turns": [{"prompt_tokens": 5, "output_tokens": 3}]}'
    path = tmp_path / "trace.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(TraceError, match=message):
        read_trace(path)
    with pytest.raises(TraceError, match=message):
        load_named_trace(path)


def test_trace_file_round_trip_and_token_scale(tmp_path: Path) -> None:
    programs = load_named_trace("swebench", programs=3)
    path = tmp_path / "t.jsonl"
    write_trace(programs, path)
    assert load_named_trace(path) == programs
    scaled = load_named_trace(path, programs=2, token_scale=0.1)
    assert len(scaled) == 2
    assert scaled[0].turns[0].prompt_tokens == round(programs[0].turns[0].prompt_tokens * 0.1)
    assert_valid(scaled)


# Determinism and arrivals


def test_same_seed_same_trace() -> None:
    for name in ("swebench", "bfcl"):
        a = load_named_trace(name, programs=20, seed=7, token_scale=0.5)
        assert a == load_named_trace(name, programs=20, seed=7, token_scale=0.5)
        assert a != load_named_trace(name, programs=20, seed=8, token_scale=0.5)


def test_swebench_prefers_the_full_shared_file(shared_traces: Path) -> None:
    assert len(load_named_trace("swebench")) == 500
    assert_valid(load_swebench(options=BuildOptions(token_scale=0.25, max_turns=8)))


def test_poisson_arrivals_rate_and_determinism() -> None:
    programs = load_named_trace("swebench", programs=1) * 20_000
    timed = with_poisson_arrivals(programs, jps=2.5, seed=3)
    arrivals = [p.arrival_s for p in timed]
    assert all(b > a for a, b in itertools.pairwise(arrivals))
    assert len(timed) / arrivals[-1] == pytest.approx(2.5, rel=0.03)
    assert timed == with_poisson_arrivals(programs, jps=2.5, seed=3)
    assert timed != with_poisson_arrivals(programs, jps=2.5, seed=4)
    with pytest.raises(ValueError, match="rate"):
        with_poisson_arrivals(programs, jps=0, seed=0)


# CLI


def test_cli_convert_and_stats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bfcl.jsonl"
    argv = ["trace", "convert", "--from", "bfcl", "--out", str(out), "--programs", "5"]
    assert main([*argv, "--jps", "1", "--seed", "2"]) == 0
    programs = read_trace(out)
    assert len(programs) == 5 and programs[0].arrival_s > 0
    assert main(["trace", "stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "turns per program" in printed and "tool duration (s)" in printed
    assert main(["trace", "stats", "no-such-trace"]) == 2
    assert "no trace 'no-such-trace'" in capsys.readouterr().err
