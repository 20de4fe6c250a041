"""Experiment machinery without a server: system definitions, ratios and the report."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from continuum_tiered.core.profile import load_named_profile
from continuum_tiered.core.server_process import BLOCK_SIZE
from continuum_tiered.lab import demo
from continuum_tiered.lab.cli import (
    engine_for,
    experiment_parser,
    resolve_defaults,
    setup_lines,
)
from continuum_tiered.lab.experiment import (
    ABLATION,
    BASELINES,
    CONTINUUM_TIERED,
    GPU_TIERS,
    VLLM,
    VLLM_LMCACHE,
    Results,
    ServedModel,
    SystemRun,
    bound_kv_blocks,
    other_vllm_servers,
    trace_programs,
    wait_for_quiet_machine,
)
from continuum_tiered.lab.report import ratios_to_baseline, write_report
from continuum_tiered.replay.runner import ProgramRecord, TurnRecord, summarize_records
from continuum_tiered.vllm.tiers import Tiers

ENGINE = ServedModel.random_cpu(Path("/models/tiny"), 64)
SCRATCH = Path("/scratch/run-1")


def fake_run(system: str, repeat: int, jcts: list[float], failed: int = 0) -> SystemRun:
    records = []
    for i, jct in enumerate(jcts):
        record = ProgramRecord(f"p{i}", start_s=float(i), end_s=i + jct)
        record.turns = [TurnRecord(100, 40, 5, jct / 2, 0.1, 1) for _ in range(2)]
        records.append(record)
    records += [ProgramRecord(f"bad{k}", 0.0, 1.0, error="boom") for k in range(failed)]
    counters = {"pins_created": 3.0} if system != "vllm" else {}
    summary = summarize_records(system, 2.0, records)
    load = (1.0 + repeat, 2.0 + repeat)
    return SystemRun(system, repeat, ["serve", system], records, summary, counters, load)


def option(command: list[str], name: str) -> str | None:
    """The value after ``name`` in a command line, or None."""
    return command[command.index(name) + 1] if name in command else None


def test_vanilla_sends_no_hints_and_has_no_connector():
    command = VLLM.command(ENGINE, SCRATCH)
    assert "vllm.entrypoints.openai.api_server" in command
    assert "--kv-transfer-config" not in command
    assert "--enable-prompt-tokens-details" in command
    assert "--num-gpu-blocks-override" in command  # same memory as every other system
    assert not VLLM.send_hints


def test_vllm_lmcache_is_plain_vllm_with_the_plugins_lmcache_settings():
    command = VLLM_LMCACHE.command(ENGINE, SCRATCH)
    assert "vllm.entrypoints.openai.api_server" in command and "serve" not in command
    config = json.loads(option(command, "--kv-transfer-config") or "{}")
    assert config["kv_connector"] == "LMCacheConnectorV1"
    extra = config["kv_connector_extra_config"]
    assert extra == Tiers.parse(ENGINE.tiers.spec(SCRATCH)).lmcache_config()
    assert extra["lmcache.local_disk"].startswith(f"file://{SCRATCH}/")
    assert not VLLM_LMCACHE.send_hints


def test_the_full_system_has_the_default_policy_and_tiers():
    command = CONTINUUM_TIERED.command(ENGINE, SCRATCH)
    assert CONTINUUM_TIERED.send_hints
    assert command[2:5] == ["continuum_tiered.cli", "serve", ENGINE.model]
    assert option(command, "--policy") is None
    assert option(command, "--tiers") == f"cpu=64MiB,disk={SCRATCH}:1GiB:cleanup"
    assert [s.name for s in BASELINES] == ["vllm", "vllm+lmcache", "continuum-tiered"]


def test_ablation_adds_one_piece_per_step():
    commands = {s.name: s.command(ENGINE, SCRATCH) for s in ABLATION}
    assert list(commands) == [
        "vllm",
        "fcfs",
        "fcfs+ttl-2s",
        "fcfs+cost-ttl",
        "fcfs+cost-ttl+tiers",
        "+tiered-policy",
    ]
    assert [(option(c, "--policy"), "--tiers" in c) for c in commands.values()] == [
        (None, False),
        ("none", False),
        ("static-ttl", False),
        ("continuum", False),
        ("continuum", True),
        ("tiered", True),
    ]
    assert option(commands["fcfs+ttl-2s"], "--policy-option") == "ttl_s=2"
    assert ENGINE.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}  # one core layout for all
    for name, command in commands.items():
        assert "--num-gpu-blocks-override" in command
        assert option(command, "--profile") == (None if name == "vllm" else "cpu-demo-llama")


def test_cpu_profile_matches_the_demo_model_and_has_both_tiers():
    profile = load_named_profile("cpu-demo-llama")
    assert profile.model.kv_bytes_per_token == 8192  # 2 x 4 layers x 8 heads x 64 x bf16
    assert set(profile.tiers) == {"cpu", "disk"}
    assert profile.reload_time("cpu", 2048) < profile.reload_time("disk", 2048)
    assert profile.reload_time("disk", 2048) < profile.prefill_time(2048)


def test_other_vllm_servers_are_waited_for_then_reported(capsys: pytest.CaptureFixture[str]):
    """A process whose command line names vLLM's server module is another server unless
    this process started it. (Servers of other users of the machine may come and go: only
    the test's own sleeper, marked by its id, is checked for.)"""
    marker = uuid.uuid4().hex
    sleeper = "import sys, time; time.sleep(30)"
    command = [sys.executable, "-c", sleeper, marker, "vllm.entrypoints.openai.api_server"]

    def marked() -> list[int]:
        found = []
        for pid in other_vllm_servers():
            with contextlib.suppress(psutil.NoSuchProcess):  # another user's server ended
                if marker in psutil.Process(pid).cmdline():
                    found.append(pid)
        return found

    with subprocess.Popen(command) as ours:
        assert marked() == []
        ours.kill()
    # Started by a shell that exits at once, the same command is no child of ours.
    subprocess.run(["bash", "-c", f"{shlex.join(command)} >/dev/null 2>&1 &"], check=True)
    deadline = time.monotonic() + 30  # until the shell's child has exec'd the sleeper
    while not (foreign := marked()) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert len(foreign) == 1
        wait_for_quiet_machine(max_wait_s=0.2, poll_s=0.1)
        assert "other vLLM servers still run" in capsys.readouterr().out
    finally:
        for pid in foreign:
            os.kill(pid, signal.SIGKILL)


def test_ratios_are_medians_of_paired_runs():
    results = Results(
        runs={
            "vllm": [fake_run("vllm", k, [j, j]) for k, j in enumerate((10.0, 20.0, 30.0), 1)],
            "ours": [fake_run("ours", k, [j, j]) for k, j in enumerate((5.0, 5.0, 30.0), 1)],
        },
    )
    vllm, ours = ratios_to_baseline(results)
    assert vllm.avg_jct_speedup == pytest.approx(1.0)
    assert ours.avg_jct_speedup == pytest.approx(2.0)  # median of 2, 4, 1
    assert ours.throughput_gain > 1


def test_report_has_tables_plots_and_loads(tmp_path: Path):
    results = Results(
        runs={
            "vllm": [fake_run("vllm", 1, [10.0, 12.0])],
            "continuum-tiered": [fake_run("continuum-tiered", 1, [5.0, 6.0], failed=1)],
        },
    )
    report = write_report(results, tmp_path, "Test", {"command": "swebench.py --repeats 1"})
    text = report.read_text()
    assert "| policy | jps | avg JCT s" in text
    assert "| continuum-tiered | 2.00x |" in text
    assert "- continuum-tiered (run 1): 1" in text  # failed programs
    assert "pins_created=3" in text
    assert "| continuum-tiered | 2.00x (load 2.0-3.0) |" in text  # per run, with its load
    assert "`serve vllm`" in text and "swebench.py --repeats 1" in text
    for name in ("jct_cdf.png", "avg_jct.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["continuum-tiered"][0]["failed_programs"] == 1
    assert saved["runs"]["vllm"][0]["load_average_1m"] == {"start": 2.0, "end": 3.0}


def test_ratio_of_a_system_without_completed_programs_is_nan():
    results = Results(
        runs={"vllm": [fake_run("vllm", 1, [1.0])], "dead": [fake_run("dead", 1, [], failed=2)]},
    )
    assert math.isnan(ratios_to_baseline(results)[1].avg_jct_speedup)


def test_cli_defaults_and_gpu_engine(tmp_path: Path):
    args = experiment_parser("t", tmp_path).parse_args([])
    resolve_defaults(args)
    assert (args.programs, args.turns, args.repeats, args.token_scale) == (8, 8, 1, 0.25)
    assert args.kv_blocks == 256
    setup = setup_lines(args, "swebench", ENGINE)
    assert "hidden 512, MLP 1536, 4 layers" in setup["model"]
    assert "8 programs x first 8 turns, tokens x0.25" in setup["trace"]
    assert setup["LMCache tiers"] == "CPU 64MiB, disk 1GiB"
    bad = experiment_parser("t", tmp_path).parse_args(["--model", "m", "--kv-blocks", "9"])
    with pytest.raises(SystemExit, match="num-gpu-blocks-override"):
        resolve_defaults(bad)
    args = experiment_parser("t", tmp_path).parse_args(
        ["--model", "meta-llama/Llama-3.1-8B", "--vllm-arg=--max-model-len 32768"]
    )
    resolve_defaults(args)
    assert args.token_scale == 1.0
    engine = engine_for(args)
    assert engine.flags == ("--max-model-len", "32768")
    assert engine.served_name == "meta-llama/Llama-3.1-8B"
    assert (engine.tiers, engine.plugin_options, engine.env) == (GPU_TIERS, (), {})


def test_trace_programs_are_cut_and_spread():
    programs = trace_programs("swebench", 3, 2, 0.25, jps=2.0, seed=0)
    assert len(programs) == 3 and all(len(p.turns) <= 2 for p in programs)
    arrivals = [p.arrival_s for p in programs]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_demo_prints_its_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runs = {
        "vllm": fake_run("vllm", 1, [10.0, 12.0]),
        "continuum-tiered": fake_run("continuum-tiered", 1, [5.0, 6.0]),
        "vllm-bound": fake_run("vllm-bound", 1, [4.0, 4.0]),
    }
    demo.print_tables(runs)
    out = capsys.readouterr().out
    assert "JCT ours s JCT bound s" in out and "p1" in out
    assert "vLLM/ours ours/bound" in out
    assert "avg_jct_s                   11.00       5.50       4.00       2.00       1.38" in out
    demo.print_repeats({name: [run, run] for name, run in runs.items()})
    out = capsys.readouterr().out
    assert "  2                  11.00                   5.50                   4.00" in out
    assert "2.00       1.38  2.00-3.00, 2.00-3.00, 2.00-3.00" in out
    assert "median average-JCT vLLM/ours over 2 runs: 2.00" in out
    assert "median average-JCT ours/bound over 2 runs: 1.38" in out
    saved = demo.results_json({name: [run] for name, run in runs.items()}, {"vllm-bound": 9})
    assert saved["jct_ratios"][0]["ours/bound"]["avg_jct_s"] == pytest.approx(5.5 / 4)
    assert saved["jct_ratios"][0]["vLLM/ours"]["p95_jct_s"] > 1
    assert list(saved["runs"]) == ["vllm", "continuum-tiered", "vllm-bound"]
    demo.plot(runs, tmp_path / "jct.png")
    assert (tmp_path / "jct.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_runs_the_bound_with_a_pool_for_every_final_context():
    programs = trace_programs("swebench", 3, 2, 0.25, jps=2.0, seed=0)
    blocks = bound_kv_blocks(programs)
    final = sum(p.turns[-1].prompt_tokens + p.turns[-1].output_tokens for p in programs)
    assert blocks * BLOCK_SIZE >= final + len(programs) * BLOCK_SIZE
    systems = demo.demo_systems(tiers=True, bound_blocks=blocks)
    assert [s.name for s in systems] == ["vllm", "continuum-tiered", "vllm-bound"]
    assert [s.name for s in systems] == list(demo.NAMES)
    vllm, ours, bound = (s.command(ENGINE, SCRATCH) for s in systems)
    assert not systems[2].send_hints and "--kv-transfer-config" not in bound
    assert option(vllm, "--num-gpu-blocks-override") == option(ours, "--num-gpu-blocks-override")
    assert int(option(bound, "--num-gpu-blocks-override") or 0) == blocks
    assert blocks > int(option(vllm, "--num-gpu-blocks-override") or 0)
    assert option(bound, "--model") == option(vllm, "--model")


def test_demo_without_tiers_is_the_plugin_alone_under_the_same_name():
    assert demo.WITHOUT_TIERS.name == CONTINUUM_TIERED.name
    command = demo.WITHOUT_TIERS.command(ENGINE, SCRATCH)
    assert "--tiers" not in command and option(command, "--policy") is None
