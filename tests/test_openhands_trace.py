"""OpenHands traces: the embedded compact file, the raw-log parser on a small synthetic run,
the converter script end to end, and the errors malformed input gets."""

from __future__ import annotations

import importlib.util
import itertools
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest

from continuum_tiered.traces.build import BuildOptions, data_path
from continuum_tiered.traces.model import TraceError, program_from_json
from continuum_tiered.traces.openhands import (
    EMBEDDED_PROGRAMS,
    load_openhands,
    read_completion,
    recorded_calls,
    step_times,
    tool_name,
)

EMBEDDED = data_path(EMBEDDED_PROGRAMS)
SCRIPT = Path(__file__).parents[1] / "experiments" / "convert_openhands.py"
LOCAL = timezone(timedelta(hours=-7))  # the synthetic run's log clock: UTC-7


def _records() -> list[dict]:
    return [json.loads(line) for line in EMBEDDED.read_text().splitlines()]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convert_openhands", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The embedded file


def test_embedded_file_loads_every_program_with_prompts_that_extend() -> None:
    programs = load_openhands()
    assert len(programs) == 50
    assert sum(len(p.turns) for p in programs) == 1135
    ids = [p.program_id for p in programs]
    assert ids == sorted(set(ids))
    assert ids[0] == "astropy__astropy-12907"
    for p in programs:
        assert program_from_json(json.loads(json.dumps(p.to_json()))) == p


def test_embedded_durations_are_the_recorded_gaps_whatever_the_seed() -> None:
    """Call 1 of astropy__astropy-12907, checked by hand against the raw run: its response
    was logged at Unix 1733339388.6496818 (19:09:48.650 UTC) and the controller logged the
    next step at 12:09:48,757 local (UTC-7), so the tool ran 0.107 s."""
    program = load_openhands(limit=1)[0]
    assert program.program_id == "astropy__astropy-12907"
    assert [t.tool for t in program.turns[:4]] == ["ls", "edit", "python", "read"]
    assert program.turns[1].tool_duration_s == pytest.approx(0.107, abs=1e-9)
    assert program.turns[-1].tool_duration_s == 0.0
    for record, loaded in zip(
        _records(), load_openhands(options=BuildOptions(seed=7)), strict=True
    ):
        calls = record["calls"]
        gaps = [round(b["start_s"] - a["end_s"], 3) for a, b in itertools.pairwise(calls)]
        assert [c["tool_duration_s"] for c in calls[:-1]] == pytest.approx(gaps, abs=1e-9)
        assert [t.tool_duration_s for t in loaded.turns] == pytest.approx([*gaps, 0.0])


def test_embedded_calls_keep_the_provider_counts_where_they_extend() -> None:
    record = _records()[0]
    program = load_openhands(limit=1)[0]
    first = record["calls"][0]
    assert (program.turns[0].prompt_tokens, program.turns[0].output_tokens) == (
        first["prompt_tokens"],
        first["completion_tokens"],
    )
    assert first["prompt_tokens"] == 2154


def test_loading_is_deterministic_and_limit_takes_a_prefix() -> None:
    first, again = load_openhands(), load_openhands()
    assert first == again
    assert load_openhands(limit=5) == first[:5]
    scaled = load_openhands(options=BuildOptions(token_scale=0.5, max_turns=3), limit=2)
    assert [len(p.turns) for p in scaled] == [3, 3]
    assert [t.tool_duration_s for t in scaled[0].turns[:2]] == [
        t.tool_duration_s for t in first[0].turns[:2]
    ]
    assert scaled[0].turns[0].prompt_tokens == 1077


# The raw parser on a synthetic run


def _completion(time_s: float, messages: int, prompt: int, tool: dict | None) -> dict:
    message: dict[str, object] = {"role": "assistant", "content": "ok"}
    if tool is not None:
        message["tool_calls"] = [
            {
                "id": "t",
                "type": "function",
                "function": {**tool, "arguments": json.dumps(tool["arguments"])},
            }
        ]
    return {
        "messages": [{"role": "user", "content": "x"}] * messages,
        "response": {
            "choices": [{"index": 0, "message": message}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": 10 + messages,
                "prompt_tokens_details": {"cached_tokens": prompt // 2},
            },
        },
        "timestamp": time_s,
        "cost": 0.0,
    }


BASH = {"name": "execute_bash", "arguments": {"command": "cd /repo && grep -rn foo ."}}
VIEW = {"name": "str_replace_editor", "arguments": {"command": "view", "path": "/repo/a.py"}}
FINISH = {"name": "finish", "arguments": {}}
T0 = datetime(2024, 12, 4, 12, 0, 0, tzinfo=LOCAL).timestamp()


def _log_line(t: float) -> str:
    """A controller step line at ``t`` on the log's local clock (whole milliseconds)."""
    ms = round(t * 1000)
    stamp = datetime.fromtimestamp(ms // 1000, LOCAL).strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{stamp},{ms % 1000:03d} - INFO - [Agent Controller default] "
        "LEVEL 0 LOCAL STEP 0 GLOBAL STEP 0\n"
    )


def synthetic_run() -> tuple[list[dict], str]:
    """Two aborted attempts (two calls, then one) and the kept one: a grep that runs 2.5 s,
    a reply without a tool (the user answers in 0.1 s), a view that runs 0.25 s, finish."""
    aborted = [
        _completion(T0 + 5.0, 2, 900, BASH),
        _completion(T0 + 9.0, 4, 1000, VIEW),
        _completion(T0 + 50.0, 2, 1000, BASH),
    ]
    steps = [T0, T0 + 6.0, T0 + 48.0, T0 + 100.0, T0 + 104.5, T0 + 106.6, T0 + 109.25]
    kept = [
        _completion(T0 + 102.0, 2, 1000, BASH),
        _completion(T0 + 106.5, 4, 1500, None),
        _completion(T0 + 109.0, 6, 1600, VIEW),
        _completion(T0 + 112.0, 8, 1700, FINISH),
    ]
    log = "noise line\n" + "".join(_log_line(t) for t in steps)
    return aborted + kept, log


def test_raw_parser_keeps_the_last_attempt_with_recorded_durations() -> None:
    completions, log = synthetic_run()
    parsed = [read_completion(c, f"call {i}") for i, c in enumerate(reversed(completions))]
    calls = recorded_calls(parsed, step_times(log.splitlines()), "synthetic")
    assert [c.tool for c in calls] == ["grep", None, "read", "finish"]
    assert [c.prompt_tokens for c in calls] == [1000, 1500, 1600, 1700]
    assert [c.completion_tokens for c in calls] == [12, 14, 16, 18]
    assert [c.cached_tokens for c in calls] == [500, 750, 800, 850]
    assert [c.start_s for c in calls] == [0.0, 4.5, 6.6, 9.25]
    assert [c.end_s for c in calls] == [2.0, 6.5, 9.0, 12.0]
    assert [c.tool_duration_s for c in calls] == pytest.approx([2.5, 0.1, 0.25, 0.0])


def test_raw_parser_takes_a_stated_clock_offset() -> None:
    completions, log = synthetic_run()
    parsed = [read_completion(c, "c") for c in completions]
    steps = step_times(log.splitlines())
    assert recorded_calls(parsed, steps, "s", utc_offset_s=7 * 3600) == recorded_calls(
        parsed, steps, "s"
    )
    with pytest.raises(TraceError, match="no step line before call 0"):
        recorded_calls(parsed, steps, "s", utc_offset_s=6 * 3600)


def test_converter_writes_a_file_the_loader_reads(tmp_path: Path) -> None:
    completions, log = synthetic_run()
    run = tmp_path / "run"
    (run / "llm_completions" / "repo__issue-1").mkdir(parents=True)
    (run / "infer_logs").mkdir()
    for i, c in enumerate(completions):
        (run / "llm_completions" / "repo__issue-1" / f"call-{c['timestamp']}-{i}.json").write_text(
            json.dumps(c)
        )
    (run / "infer_logs" / "instance_repo__issue-1.log").write_text(log)
    meta = {"agent_class": "CodeActAgent", "llm_config": {"model": "proxy/m1"}, "dataset": "d"}
    (run / "metadata.json").write_text(json.dumps(meta))
    out = tmp_path / "out.jsonl"
    assert _script().main([str(run), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["source"] == "OpenHands CodeActAgent / m1 / d"
    [program] = load_openhands(out)
    assert program.program_id == "repo__issue-1"
    assert [t.tool_duration_s for t in program.turns] == pytest.approx([2.5, 0.1, 0.25, 0.0])


@pytest.mark.parametrize(
    ("function", "arguments", "expected"),
    [
        ("execute_bash", {"command": "PYTHONPATH=/w python t.py"}, "python"),
        ("execute_bash", {"command": "/usr/bin/python3 -m pytest -x"}, "python3"),
        ("execute_bash", {"command": ""}, "bash"),
        ("str_replace_editor", {"command": "str_replace", "path": "a"}, "edit"),
        ("str_replace_editor", {"command": "create", "path": "a"}, "edit"),
        ("execute_ipython_cell", {"code": "1"}, "ipython"),
        ("browser", {"code": "goto('x')"}, "browse"),
        ("think", {"thought": "hm"}, "think"),
        ("my tool!", {}, "other"),
    ],
)
def test_tool_names(function: str, arguments: dict, expected: str) -> None:
    assert tool_name(function, json.dumps(arguments), "call") == expected


# Malformed input


def test_a_completion_without_a_prompt_count_names_the_field() -> None:
    completion = _completion(T0, 2, 1000, BASH)
    del completion["response"]["usage"]["prompt_tokens"]
    with pytest.raises(TraceError, match=r"^f\.json field response\.usage\.prompt_tokens: "):
        read_completion(completion, "f.json")
    completion = _completion(T0, 2, 1000, BASH)
    completion["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = "{"
    with pytest.raises(TraceError, match=r"tool_calls\[0\]\.function\.arguments: not JSON"):
        read_completion(completion, "f.json")
    with pytest.raises(TraceError, match="field timestamp"):
        read_completion({**_completion(T0, 2, 1000, BASH), "timestamp": "noon"}, "f.json")


def test_a_broken_compact_file_names_file_line_program_and_field(tmp_path: Path) -> None:
    records = _records()[:2]
    records[1]["calls"][1]["prompt_tokens"] = "many"
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pid = records[1]["program_id"]
    pattern = rf"broken\.jsonl line 2 program '{pid}' field calls\[1\]\.prompt_tokens: "
    with pytest.raises(TraceError, match=pattern):
        load_openhands(path)
    del records[1]["calls"][1]["prompt_tokens"]
    records[1]["calls"][0]["tool_duration_s"] = -1
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(TraceError, match=r"line 2 .* calls\[0\]\.tool_duration_s: "):
        load_openhands(path)
    path.write_text("{not json\n")
    with pytest.raises(TraceError, match="line 1: not JSON"):
        load_openhands(path)
    with pytest.raises(TraceError, match="not readable"):
        load_openhands(tmp_path / "absent.jsonl")
