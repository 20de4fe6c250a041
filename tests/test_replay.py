"""``continuum-tiered replay`` end to end, against one ``continuum-tiered serve`` on the CPU build.

The server is started once for the module; the last test kills it mid-run. The tests of
bad inputs and timeouts need no server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from continuum_tiered.cli import main
from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
)
from continuum_tiered.replay.runner import RetryPolicy, RunnerOptions, run_programs
from continuum_tiered.traces.model import TraceProgram, Turn, write_trace

TURNS = 3
OUTPUT_TOKENS = 8
# Retries that give up within seconds once the server is gone.
FAST_RETRIES = ["--attempts", "3", "--backoff", "0.2", "--retry-window", "3"]


def write_small_trace(path: Path) -> Path:
    """Two programs of three turns, each prompt extending the last one by 40 tokens."""
    turns = tuple(Turn(80 + 40 * i, OUTPUT_TOKENS, "ls", 0.1) for i in range(TURNS))
    write_trace([TraceProgram(f"program-{k}", turns) for k in range(2)], path)
    return path


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    # Pins every hinted turn, so the hints' arrival shows in the pin counter.
    command = plugin_server_command(
        tiny_model_dir, 64, "--policy", "static-ttl", "--policy-option", "ttl_s=60"
    )
    log = tmp_path_factory.mktemp("replay-server") / "server.log"
    with ServerProcess(command, log) as process:
        yield process


def replay_args(endpoint: str, trace: Path, out: Path, hints: str = "on") -> list[str]:
    return [
        "replay",
        "--endpoint",
        endpoint,
        "--trace",
        str(trace),
        "--jps",
        "20",
        "--programs",
        "2",
        "--policy-hints",
        hints,
        "--out",
        str(out),
    ]


def read_outputs(out: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((out / "summary.json").read_text())
    programs = [json.loads(line) for line in (out / "programs.jsonl").read_text().splitlines()]
    return summary, programs


def test_replay_client_imports_no_vllm():
    code = "import sys, continuum_tiered.replay.cli; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_missing_trace_is_exit_code_2_with_the_reason(tmp_path, capsys):
    args = replay_args("http://127.0.0.1:1", tmp_path / "absent.jsonl", tmp_path / "out")
    assert main(args) == 2
    assert "no trace" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_endpoint_down_is_exit_code_2_after_a_short_probe(tmp_path, capsys):
    trace = write_small_trace(tmp_path / "trace.jsonl")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    assert main(replay_args(endpoint, trace, tmp_path / "out")) == 2
    assert time.monotonic() - started < 10
    assert "no OpenAI-compatible server answers" in capsys.readouterr().err


def test_a_request_without_reply_times_out_and_fails_its_program():
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        program = TraceProgram("p", (Turn(8, 2, None, 0.0),))
        retry = RetryPolicy(attempts=2, backoff_s=0.1, request_timeout_s=0.5)
        options = RunnerOptions(model="tiny", send_hints=False, retry=retry)
        started = time.monotonic()
        (record,) = asyncio.run(run_programs(url, [program], options))
    assert time.monotonic() - started < 5
    assert record.turns == []
    assert record.error is not None
    assert "no complete reply within 0.5 s" in record.error and "attempt 2 of 2" in record.error


def metric_sum(server: ServerProcess, name: str) -> float:
    return prometheus_samples(server.url).get(name, 0.0)


@pytest.mark.parametrize(("hints", "label"), [("on", None), ("off", "vanilla-requests")])
def test_programs_replay_end_to_end(server, tmp_path, hints, label):
    trace = write_small_trace(tmp_path / "trace.jsonl")
    args = replay_args(server.url, trace, tmp_path / "out", hints)
    pins_before = metric_sum(server, "vllm:continuum_pins_created_total")
    assert main(args + (["--label", label] if label else [])) == 0
    pins = metric_sum(server, "vllm:continuum_pins_created_total") - pins_before
    # With hints, every turn but the last. Without, serve's middleware still finds each
    # program (its routing header) but never hears of a last turn: every turn is pinned.
    assert pins == (2 * (TURNS - 1) if hints == "on" else 2 * TURNS)
    summary, programs = read_outputs(tmp_path / "out")
    (run,) = summary["runs"]
    assert run["policy"] == (label or "hints-on")
    assert run["programs"] == 2 and summary["failed_programs"] == 0
    assert run["avg_jct_s"] >= 0 and run["p95_jct_s"] >= run["p50_jct_s"] >= 0
    assert 0 < run["avg_queue_s"] < run["avg_jct_s"]
    for program in programs:
        assert program["error"] is None
        assert program["end_s"] >= program["start_s"] >= 0
        turns = program["turns"]
        assert len(turns) == TURNS
        assert [t["prompt_tokens"] for t in turns] == [80, 120, 160]
        assert all(t["output_tokens"] == OUTPUT_TOKENS for t in turns)
        assert all(0 <= t["ttft_s"] <= t["latency_s"] for t in turns)
        if hints == "on":
            assert all(t["cached_tokens"] > 0 for t in turns[1:])
    if hints == "on":
        assert run["prefix_hit_ratio"] > 0


def test_server_killed_during_tool_calls_fails_the_programs_without_hanging(
    server, tmp_path, capsys
):
    """Runs last: it stops the module's server."""
    trace = write_small_trace(tmp_path / "trace.jsonl")
    # Tool calls of 0.1 s x 30 = 3 s: both programs sleep in one when the server goes.
    args = [*replay_args(server.url, trace, tmp_path / "out"), "--time-scale", "30"]
    args += [*FAST_RETRIES, "--request-timeout", "10"]
    before = metric_sum(server, "vllm:request_success_total")
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while metric_sum(server, "vllm:request_success_total") < before + 2:  # both first turns done
        assert time.monotonic() < deadline, "the first turns did not finish"
        time.sleep(0.1)
    server.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the replay hangs after its server died"
    assert codes == [0]
    summary, programs = read_outputs(tmp_path / "out")
    assert summary["failed_programs"] == 2
    assert summary["runs"][0]["programs"] == 0 and summary["runs"][0]["avg_jct_s"] is None
    for program in programs:
        assert len(program["turns"]) == 1
        assert program["error"].startswith("turn 1: ")
    assert "2 of 2 programs failed" in capsys.readouterr().err
