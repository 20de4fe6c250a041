"""Experiment machinery without a server: system definitions, ratios and the report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from continuum_tiered import demo
from continuum_tiered.agent_runner import ProgramRecord, TurnRecord, summarize_records
from continuum_tiered.experiment import (
    ABLATION,
    BASELINES,
    CONTINUUM_TIERED,
    VLLM,
    VLLM_LMCACHE,
    Engine,
    Results,
    SystemRun,
    gpu_name,
    trace_programs,
)
from continuum_tiered.experiment_cli import (
    engine_for,
    experiment_parser,
    resolve_defaults,
    setup_lines,
)
from continuum_tiered.experiment_report import ratios_to_baseline, write_report

ENGINE = Engine.random_cpu(Path("/models/tiny"), 64)


def fake_run(system: str, repeat: int, jcts: list[float], failed: int = 0) -> SystemRun:
    records = []
    for i, jct in enumerate(jcts):
        record = ProgramRecord(f"p{i}", start_s=float(i), end_s=i + jct)
        record.turns = [TurnRecord(100, 40, 5, jct / 2, 0.1, 1) for _ in range(2)]
        records.append(record)
    records += [ProgramRecord(f"bad{k}", 0.0, 1.0, error="boom") for k in range(failed)]
    counters = {"pins_created": 3.0} if system != "vllm" else {}
    summary = summarize_records(system, 2.0, records)
    return SystemRun(system, repeat, ["serve", system], records, summary, counters)


def test_vanilla_sends_no_hints_and_has_no_connector():
    command = VLLM.command(ENGINE)
    assert "vllm.entrypoints.openai.api_server" in command
    assert "--kv-transfer-config" not in command
    assert "--enable-prompt-tokens-details" in command
    assert "--num-gpu-blocks-override" in command  # same memory as every other system
    assert not VLLM.send_hints
    assert VLLM.skip_reason() is None


def test_plugin_systems_serve_with_their_policy():
    assert CONTINUUM_TIERED.send_hints
    assert CONTINUUM_TIERED.command(ENGINE)[2:5] == ["continuum_tiered.cli", "serve", ENGINE.model]
    commands = {s.name: s.command(ENGINE) for s in ABLATION if s.command}
    assert ABLATION[0] is VLLM
    assert commands["fcfs"][5:7] == ["--policy", "none"]
    assert commands["fcfs+ttl-2s"][5:9] == [
        "--policy",
        "static-ttl",
        "--policy-option",
        "ttl_s=2",
    ]
    assert commands["fcfs+cost-ttl"][5:7] == ["--policy", "continuum"]
    for command in commands.values():
        assert "--num-gpu-blocks-override" in command


@pytest.mark.skipif(gpu_name() is not None, reason="LMCache may run on this GPU machine")
def test_lmcache_systems_are_skipped_without_a_gpu():
    assert "no GPU" in (VLLM_LMCACHE.skip_reason() or "")
    tiers = ABLATION[-1]
    assert tiers.command is None and "no GPU" in (tiers.skip_reason() or "")
    assert [s.name for s in BASELINES] == ["vllm", "vllm+lmcache", "continuum-tiered"]


def test_ratios_are_medians_of_paired_runs():
    results = Results(
        runs={
            "vllm": [fake_run("vllm", k, [j, j]) for k, j in enumerate((10.0, 20.0, 30.0), 1)],
            "ours": [fake_run("ours", k, [j, j]) for k, j in enumerate((5.0, 5.0, 30.0), 1)],
        },
        skipped={},
    )
    vllm, ours = ratios_to_baseline(results)
    assert vllm.avg_jct_speedup == pytest.approx(1.0)
    assert ours.avg_jct_speedup == pytest.approx(2.0)  # median of 2, 4, 1
    assert ours.throughput_gain > 1


def test_report_has_tables_plots_and_skips(tmp_path: Path):
    results = Results(
        runs={
            "vllm": [fake_run("vllm", 1, [10.0, 12.0])],
            "continuum-tiered": [fake_run("continuum-tiered", 1, [5.0, 6.0], failed=1)],
        },
        skipped={"vllm+lmcache": "no GPU: LMCache's connector does not run on vLLM's CPU build"},
    )
    report = write_report(results, tmp_path, "Test", {"command": "swebench.py --repeats 1"})
    text = report.read_text()
    assert "| policy | jps | avg JCT s" in text
    assert "| continuum-tiered | 2.00x |" in text
    assert "- continuum-tiered (run 1): 1" in text  # failed programs
    assert "pins_created=3" in text
    assert "vllm+lmcache: no GPU" in text
    assert "`serve vllm`" in text and "swebench.py --repeats 1" in text
    for name in ("jct_cdf.png", "avg_jct.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"]["continuum-tiered"][0]["failed_programs"] == 1
    assert saved["skipped"] == results.skipped


def test_ratio_of_a_system_without_completed_programs_is_nan():
    results = Results(
        runs={"vllm": [fake_run("vllm", 1, [1.0])], "dead": [fake_run("dead", 1, [], failed=2)]},
        skipped={},
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


def test_trace_programs_are_cut_and_spread():
    programs = trace_programs("swebench", 3, 2, 0.25, jps=2.0, seed=0)
    assert len(programs) == 3 and all(len(p.turns) <= 2 for p in programs)
    arrivals = [p.arrival_s for p in programs]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


def test_demo_prints_its_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runs = {
        "vllm": fake_run("vllm", 1, [10.0, 12.0]),
        "continuum-tiered": fake_run("continuum-tiered", 1, [5.0, 6.0]),
    }
    demo.print_tables(runs)
    out = capsys.readouterr().out
    assert "JCT ours s" in out and "p1" in out
    assert "avg_jct_s                   11.00       5.50       2.00" in out
    demo.plot(runs, tmp_path / "jct.png")
    assert (tmp_path / "jct.png").read_bytes()[:4] == b"\x89PNG"
