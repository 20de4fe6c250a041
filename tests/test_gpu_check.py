"""scripts/gpu-check.sh, the GPU check kit, where there is no GPU: it stops naming the CUDA
device it needs; its comparison table works on fixture profiles; and its rehearsal runs
every step on the CPU with the tiny model (LMCache's store and load on vLLM's CPU layout
included, every byte checked)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from continuum_tiered.core.profile import Tier, TierProfile, load_named_profile

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "scripts" / "gpu-check.sh"


def kit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(KIT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_a_gpu_the_kit_stops_naming_the_cuda_device(tmp_path: Path) -> None:
    run = kit("--out", str(tmp_path / "out"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "needs an NVIDIA CUDA device" in run.stderr
    assert "torch.cuda.is_available() is False" in run.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "needs an NVIDIA CUDA device" in summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.txt"]


def test_kit_refuses_an_unknown_argument() -> None:
    run = kit("--gpu")
    assert run.returncode == 2 and "unknown argument --gpu" in run.stderr


def write_measured(directory: Path, model: str, bandwidth_factor: float) -> None:
    derived = load_named_profile(f"h100-{model}")
    cpu = derived.tiers["cpu"]
    tiers = {
        **derived.tiers,
        "cpu": Tier("cpu", cpu.bandwidth_bytes_per_s * bandwidth_factor, 3e-5),
    }
    dataclasses.replace(derived, tiers=tiers, source="fixture").save(directory / f"{model}.json")


def test_comparison_of_a_run_folder(tmp_path: Path) -> None:
    write_measured(tmp_path, "llama-3.1-8b", 0.75)
    write_measured(tmp_path, "llama-3.1-70b-tp4", 0.5)
    run = kit("--compare-only", str(tmp_path))
    assert run.returncode == 0, run.stderr
    table = (tmp_path / "comparison.md").read_text()
    assert table == run.stdout
    eight_b, seventy_b = table.split("### llama-3.1-70b-tp4.json / h100-llama-3.1-70b-tp4")
    assert "| cpu load bandwidth | GB/s | 48 | 64 | 0.75 |" in eight_b
    assert "| cpu load bandwidth | GB/s | 32 | 64 | 0.50 |" in seventy_b
    assert "| prefill 16384 tokens | ms |" in seventy_b and "| 1.00 |" in seventy_b


def test_comparison_names_the_profile_a_failed_step_did_not_write(tmp_path: Path) -> None:
    write_measured(tmp_path, "llama-3.1-8b", 1.0)
    run = kit("--compare-only", str(tmp_path))
    assert run.returncode == 1
    assert "| cpu load bandwidth | GB/s | 64 | 64 | 1.00 |" in run.stdout
    assert "llama-3.1-70b-tp4.json / h100-llama-3.1-70b-tp4\n\nnot compared" in run.stdout


def test_rehearsal_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    """--rehearse: the kit's own path (wheels check, profile, comparison, LMCache, tests)
    on the CPU with the tiny model, so a mistake in it shows before a GPU is at hand."""
    out = tmp_path / "out"
    run = kit("--rehearse", "--out", str(out), timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    status = {
        line[:32].strip(): line[32:].strip()
        for line in (out / "summary.txt").read_text().splitlines()[1:6]
    }
    assert status["profile tiny-llama"] == "ok"
    assert status["comparison"].startswith("ok")
    assert status["CUDA test paths"] == "ok"
    expected = "ok" if importlib.util.find_spec("lmcache") else "skipped"
    assert status["lmcache store/load"].startswith(expected), status
    profile = TierProfile.load(out / "tiny-llama.json", expect_device="cpu")
    assert set(profile.tiers) == {"cpu", "disk"}
    assert "| prefill 1024 tokens | ms |" in (out / "comparison.md").read_text()
    assert not (out / "disk-tier").exists() and not (out / "lmcache-disk").exists()
