"""The profile command: an end-to-end run on the tiny model, fits, grids and bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from continuum_tiered.cli import main
from continuum_tiered.cluster.redis_server import RedisServer
from continuum_tiered.core.profile import ModelShape, ProfileError, TierProfile
from continuum_tiered.profiling import cli as profiling_cli
from continuum_tiered.profiling import compute, disk, transfers
from continuum_tiered.profiling.measure import (
    ProfilingError,
    Series,
    Timed,
    background_load,
    fit_link,
    fit_tier,
    max_transfer_tokens,
    nonnegative_lstsq,
    transfer_tokens,
)
from continuum_tiered.profiling.report import Measurements, fit_errors

# Points 10% off a curve (timing noise) fit within 25% of every point: three coefficients
# over four points leave little room for misfit. Measured points are not held to it:
# on a shared 2-core machine they move by 2x with what else runs, so the real run's
# errors are only checked to be reported.
FIT_TOLERANCE = 0.25


@dataclass(frozen=True)
class Run:
    out: Path
    stdout: str
    profile: TierProfile
    measurements: Measurements


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def run(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[Run]:
    """One --quick profile of the tiny model through the real entry point, every tier: the
    host's memory, a disk directory and a real Redis server as the remote tier."""
    tmp = tmp_path_factory.mktemp("profile")
    (tmp / "disk").mkdir()
    captured: list[tuple[TierProfile, Measurements]] = []

    def spy(job: profiling_cli.ProfileJob) -> tuple[TierProfile, Measurements]:
        captured.append(measure(job))
        return captured[-1]

    measure = profiling_cli.measure
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, two threads wait on each other
    stdout = io.StringIO()
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(profiling_cli, "measure", spy)
            argv = ["profile", "--model", str(tiny_model_dir), "--device", "cpu", "--quick"]
            tiers = f"cpu,disk:{tmp / 'disk'},remote={redis_server.url}"
            argv += ["--tiers", tiers, "--out", str(tmp / "p.json")]
            assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (profile, measurements) = captured[0]
    yield Run(tmp / "p.json", stdout.getvalue(), profile, measurements)


def tiny_shape(model_dir: Path) -> ModelShape:
    return ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))


def test_profile_loads_back_for_its_model_and_device(run: Run, tiny_model_dir: Path) -> None:
    profile = TierProfile.load(
        run.out, expect_model=tiny_shape(tiny_model_dir), expect_device="cpu"
    )
    assert profile == run.profile
    assert set(profile.tiers) == {"cpu", "disk", "remote"}
    assert profile.model.kv_bytes_per_token == 2 * 2 * 1 * 64 * 2
    assert profile.decode_coeffs is not None
    assert profile.decode_step_time(8, 4096) > profile.decode_step_time(1, 4096) > 0
    assert profile.prefill_time(8192) > profile.prefill_time(1024) > 0
    assert f"--out {run.out}" in profile.source
    assert "posix_fadvise" in profile.source
    with pytest.raises(ProfileError, match="measured on device 'cpu'"):
        TierProfile.load(run.out, expect_device="cuda")
    assert run.out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_table(run: Run) -> None:
    for heading in ("transfer", "profile tier", "prefill tokens", "decode batch", "wrote"):
        assert heading in run.stdout
    assert "largest fit error" in run.stdout


def test_profile_holds_the_fits_of_its_points(run: Run) -> None:
    m = run.measurements
    coeffs, _ = compute.fit_prefill(list(m.prefill.lengths), list(m.prefill.seconds))
    assert run.profile.prefill_coeffs == pytest.approx(coeffs, rel=1e-9)
    assert run.profile.decode_coeffs == pytest.approx(compute.fit_decode(list(m.decode.points)))
    for name, series in m.tier_series.items():
        fitted = run.profile.tiers[name].transfer_time(series.sizes[-1])
        assert fitted == pytest.approx(series.seconds[-1], rel=1e-9)


def test_fit_errors_are_reported(run: Run) -> None:
    errors = fit_errors(run.profile, run.measurements)
    assert set(errors) == {"cpu tier", "disk tier", "remote tier", "prefill", "decode"}
    assert all(np.isfinite(e) and e >= 0 for e in errors.values())
    assert f"prefill {errors['prefill']:.0%}" in run.stdout


def test_measured_grid(run: Run) -> None:
    m = run.measurements
    assert m.prefill.lengths == (1024, 2048, 4096, 8192)  # up to max_position_embeddings
    assert {(b, c) for b, c, _ in m.decode.points} == {(1, 1024), (1, 8192), (8, 1024), (8, 8192)}
    # 32-token block of 512-byte tokens up to a 128k-token context, 16x apart.
    sizes = tuple(n * 512 for n in (32, 512, 8192, 131072))
    assert [s.sizes for s in m.series] == [sizes] * 6
    assert [(s.tier, s.reload) for s in m.series] == [
        ("cpu", True),
        ("cpu", False),
        ("disk", True),
        ("disk", False),
        ("remote", True),
        ("remote", False),
    ]
    # Duplex: the cpu tier's two halves of the largest copy, the disk's largest read.
    assert [(d.tier, d.nbytes) for d in m.duplex] == [
        ("cpu", sizes[-1] // 2),
        ("cpu", sizes[-1] // 2),
        ("disk", sizes[-1]),
        ("remote", sizes[-1]),
    ]
    assert m.host_memcpy.nbytes == transfers.HOST_MEMCPY_BYTES


def test_write_duplex_and_memcpy_are_measured(run: Run) -> None:
    """Every figure is marked measured; write and duplex come from their own timings."""
    profile, m = run.profile, run.measurements
    assert profile.provenance == dict.fromkeys(profile.figure_paths(), "measured")
    assert profile.host_memcpy_bytes_per_s == m.host_memcpy.bandwidth > 0
    for name, tier in profile.tiers.items():
        store = m.store_series[name]
        assert not store.reload and store.tier == name
        assert tier.write_time(store.sizes[-1]) == pytest.approx(store.seconds[-1], rel=1e-9)
        slowest = min((d for d in m.duplex if d.tier == name), key=lambda d: d.bandwidth)
        contended = tier.latency_s + slowest.nbytes / tier.duplex_bandwidth_bytes_per_s
        assert contended == pytest.approx(slowest.seconds, rel=1e-9)
    assert "write bandwidth = disk write + fsync" in profile.source
    assert "disk read during write + fsync" in profile.source
    assert "host->pool during pool->host" in profile.source
    assert "redis GET during SET" in profile.source


def test_remote_tier_is_timed_in_lmcache_chunks_and_leaves_no_key(
    run: Run, redis_server: RedisServer
) -> None:
    """The remote tier moves 256-token values (128 KiB of the tiny model's KV), a context
    costs more than one chunk, and the profiler's keys are gone from the shared server."""
    remote = run.profile.tiers["remote"]
    assert f"{256 * 512}-byte values (one LMCache chunk)" in run.profile.source
    assert remote.transfer_time(131072 * 512) > remote.transfer_time(256 * 512) > 0
    assert remote.write_bandwidth_bytes_per_s and remote.duplex_bandwidth_bytes_per_s
    assert redis_server.keys() == 0


def test_summary_shows_the_new_figures_and_their_provenance(run: Run) -> None:
    lines = run.stdout.splitlines()
    for path in ("tiers.disk.duplex_bandwidth_bytes_per_s", "host_memcpy_bytes_per_s"):
        (row,) = [line for line in lines if line.startswith(path + " ")]
        assert row.split()[-1] == "measured" and "GB/s" in row
    assert any(
        re.match(r"disk +disk read during write \+ fsync +64\.0 MiB", line) for line in lines
    )


# --- grids and fits, without measuring ---------------------------------------------------


def test_prefill_lengths() -> None:
    assert compute.prefill_lengths(8192, None) == [1024, 2048, 4096, 8192]
    assert compute.prefill_lengths(3000, None) == [256, 512, 1024, 2048]
    assert compute.prefill_lengths(100, None) == [12, 25, 50, 100]
    assert compute.prefill_lengths(131072, 4) == [1024, 4096, 32768, 131072]


def test_transfer_sizes() -> None:
    assert transfer_tokens(32, 131072, 16) == [32, 512, 8192, 131072]
    assert transfer_tokens(16, 100, 4) == [16, 64, 100]
    assert max_transfer_tokens(512, 32, None, 1e12) == 131072
    assert max_transfer_tokens(512, 32, 2000, 1e12) == 1984  # whole blocks
    assert max_transfer_tokens(512, 32, None, 512 * 1000) == 992
    with pytest.raises(ProfilingError, match="less than one 32-token KV block"):
        max_transfer_tokens(512, 32, None, 512 * 31)


def test_fit_link_recovers_latency_and_bandwidth() -> None:
    latency, bandwidth = 20e-6, 25e9
    sizes = tuple(2**k for k in range(14, 35, 2))
    seconds = tuple(latency + n / bandwidth for n in sizes)
    tier = fit_link("cpu", Series("cpu", "x", True, sizes, seconds, ("torch",) * len(sizes)))
    assert tier.bandwidth_bytes_per_s == pytest.approx(bandwidth, rel=1e-9)
    assert tier.latency_s == pytest.approx(latency, rel=1e-9)


def test_fit_link_clamps_latency() -> None:
    sizes = (1 << 10, 1 << 20, 1 << 30)
    cached = fit_link("cpu", Series("cpu", "x", True, sizes, (1e-8, 1e-5, 0.1), ("t",) * 3))
    assert cached.latency_s == 0.0  # small copies faster than the line: no negative latency
    assert cached.bandwidth_bytes_per_s == pytest.approx(sizes[-1] / 0.1)
    flat = fit_link("cpu", Series("cpu", "x", True, sizes, (0.2, 0.2, 0.1), ("t",) * 3))
    assert flat.latency_s == pytest.approx(0.05)
    assert flat.transfer_time(sizes[-1]) == pytest.approx(0.1)


def test_fit_decode_recovers_coefficients() -> None:
    d = (0.004, 2e-4, 3e-9)
    points = [(b, c, d[0] + d[1] * b + d[2] * b * c) for b in (1, 4, 16) for c in (1024, 8192)]
    assert compute.fit_decode(points) == pytest.approx(d, rel=1e-6)


def test_fits_of_noisy_points_stay_near_every_point() -> None:
    noise = (1.1, 0.9, 0.9, 1.1, 1.1, 0.9)
    d = (0.004, 2e-4, 3e-9)
    exact = [(b, c, d[0] + d[1] * b + d[2] * b * c) for b in (1, 8) for c in (1024, 4096, 8192)]
    points = [(b, c, t * k) for (b, c, t), k in zip(exact, noise, strict=True)]
    fit = compute.fit_decode(points)
    for b, c, t in points:
        assert fit[0] + fit[1] * b + fit[2] * b * c == pytest.approx(t, rel=FIT_TOLERANCE)
    lengths = [1024, 2048, 4096, 8192]
    seconds = [(0.01 + 2e-5 * n + 1e-9 * n * n) * k for n, k in zip(lengths, noise, strict=False)]
    (c0, c1, c2), _ = compute.fit_prefill(lengths, seconds)
    for n, t in zip(lengths, seconds, strict=True):
        assert c0 + c1 * n + c2 * n * n == pytest.approx(t, rel=FIT_TOLERANCE)


def test_fits_never_go_negative() -> None:
    # Decode time falling with batch size: least squares would make d1 negative.
    points = [(1, 1000, 0.010), (8, 1000, 0.009), (1, 8000, 0.011), (8, 8000, 0.0095)]
    assert min(compute.fit_decode(points)) >= 0
    # A concave prefill curve: fit_quadratic gives c2 < 0; the fallback keeps all >= 0.
    lengths = [1024, 2048, 4096, 8192]
    seconds = [0.10, 0.19, 0.35, 0.60]
    coeffs, method = compute.fit_prefill(lengths, seconds)
    assert min(coeffs) >= 0
    assert method.startswith("nonnegative least squares")
    assert compute.fit_prefill(lengths, [0.1 + 1e-5 * n for n in lengths])[1] == (
        "least squares (fit_quadratic)"
    )


def test_nonnegative_lstsq_is_exact_when_unconstrained_is_feasible() -> None:
    design = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    assert nonnegative_lstsq(design, [1.0, 3.0, 5.0]) == pytest.approx((1.0, 2.0))
    assert nonnegative_lstsq(design, [5.0, 3.0, 1.0]) == pytest.approx((3.0, 0.0))


def test_disk_measurement(tmp_path: Path) -> None:
    result = disk.measure_disk(tmp_path, [4096, 1 << 20], repeats=1)
    assert [(s.label, s.sizes) for s in result.series] == [
        ("disk read", (4096, 1 << 20)),
        ("disk write + fsync", (4096, 1 << 20)),
    ]
    assert all(t > 0 for s in result.series for t in s.seconds)
    ((tier, label, nbytes),) = [(d.tier, d.label, d.nbytes) for d in result.duplex]
    assert (tier, label, nbytes) == ("disk", "disk read during write + fsync", 1 << 20)
    assert result.duplex[0].seconds > 0
    assert "posix_fadvise" in result.notes[0]
    assert list(tmp_path.iterdir()) == []  # the files are gone


def test_background_load_runs_throughout_and_reports_its_failure() -> None:
    runs: list[int] = []
    with background_load(lambda: runs.append(1)):
        assert runs  # it ran once before the block started
        before = len(runs)
        while len(runs) < before + 3:  # and keeps running during it
            time.sleep(1e-3)
    after = len(runs)
    time.sleep(0.05)
    assert len(runs) == after  # its thread has stopped

    def fail() -> None:
        raise OSError("disk full")

    with (
        pytest.raises(ProfilingError, match="the concurrent load failed: OSError"),
        background_load(fail),
    ):
        pass


def test_host_memcpy_is_one_large_copy() -> None:
    timed = transfers.measure_host_memcpy(repeats=1)
    assert (timed.tier, timed.nbytes) == ("host", transfers.HOST_MEMCPY_BYTES)
    assert 1e8 < timed.bandwidth < 1e12


def test_fit_tier_takes_the_latency_off_write_and_duplex() -> None:
    sizes = (1_000, 1_000_000)
    load = Series("disk", "read", True, sizes, (1e-4 + 1e-6, 1e-4 + 1e-3), ("x",) * 2)
    store = Series("disk", "write", False, sizes, (1e-4 + 2e-6, 1e-4 + 2e-3), ("x",) * 2)
    duplex = [
        Timed("disk", "read during write", 500_000, 1e-4 + 1e-3),
        Timed("disk", "write during read", 500_000, 1e-4 + 2e-3),
    ]
    tier = fit_tier("disk", load, store, duplex)
    assert tier.latency_s == pytest.approx(1e-4)
    assert tier.bandwidth_bytes_per_s == pytest.approx(1e9)
    assert tier.write_bandwidth_bytes_per_s == pytest.approx(5e8)
    assert tier.duplex_bandwidth_bytes_per_s == pytest.approx(2.5e8)  # the slower direction
    assert fit_tier("disk", load, None, []) == fit_link("disk", load)


# --- bad inputs: exit code 2 and a message naming the problem ----------------------------


@pytest.fixture
def args(tiny_model_dir: Path) -> list[str]:
    return ["profile", "--model", str(tiny_model_dir), "--device", "cpu"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--model", "/nonexistent/model"], r"no model config at /nonexistent/model"),
        (["--out", "/nonexistent/dir/p.json"], r"directory /nonexistent/dir does not exist"),
        (["--tiers", "cpu,nvme"], r"unknown tier 'nvme'; known tiers: cpu, disk"),
        (["--tiers", "cpu,remote"], r"remote tier needs a URL: remote=redis://HOST:PORT"),
        (["--tiers", "remote=http://127.0.0.1:1"], r"scheme 'http'; the remote tier is a Redis"),
        (["--tiers", "remote=redis://127.0.0.1:1"], r"remote redis://127.0.0.1:1 does not answer"),
        (["--tiers", "disk"], r"disk tier needs a directory"),
        (["--tiers", "disk:/nonexistent"], r"/nonexistent does not exist or is not a directory"),
        (["--tiers", "cpu,cpu"], r"'cpu' given twice"),
        (["--max-tokens", "8"], r"--max-tokens must be at least 64"),
    ],
)
def test_bad_inputs(
    args: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: list[str],
    message: str,
) -> None:
    argv = [*args, "--out", str(tmp_path / "p.json"), *change]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("continuum-tiered profile: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "p.json").exists()


def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--device", "cpu", "--out", str(tmp_path / "p.json")]
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "shapeless.json").write_text(json.dumps({"model_type": "llama"}))
    config = {"model_type": "no-such-model", "num_hidden_layers": 2}
    config |= {"num_attention_heads": 2, "hidden_size": 128}
    (tmp_path / "unknown.json").write_text(json.dumps(config))
    for name, message in [
        ("broken.json", "cannot read .*broken.json as JSON"),
        ("shapeless.json", "shapeless.json: HF config is missing .*'num_attention_heads'"),
        ("unknown.json", "unknown.json: transformers cannot read this config"),
    ]:
        assert main(["profile", "--model", str(tmp_path / name), *out]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err


def test_unwritable_output(
    args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert main([*args, "--out", str(tmp_path / "file" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["profile", "--model", str(tiny_model_dir), "--device", "cuda"]
    assert main([*argv, "--out", str(tmp_path / "p.json")]) == 2
    assert "--device cuda: torch" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_copies_refuse_without_a_gpu() -> None:
    with pytest.raises(ProfilingError, match=r"CUDA copies: torch .* sees no CUDA GPU"):
        transfers.measure_transfers("cuda", [4096, 1 << 20], repeats=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_profile(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    argv = ["profile", "--model", str(tiny_model_dir), "--device", "cuda", "--quick"]
    assert main([*argv, "--out", str(out)]) == 0
    profile = TierProfile.load(out, expect_model=tiny_shape(tiny_model_dir), expect_device="cuda")
    cpu = profile.tiers["cpu"]
    assert cpu.bandwidth_bytes_per_s > 1e9  # PCIe or better
    assert cpu.write_bandwidth_bytes_per_s > 1e9
    assert cpu.duplex_bandwidth_bytes_per_s is not None
    assert "pinned allocation" in profile.source
    assert "pinned host->device during device->pinned host" in profile.source


def test_engine_steps(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """--engine times vLLM's engine at the model's points (and one block of prefill more),
    writes the fits into the profile, and leaves no engine process behind."""
    captured: list[Measurements] = []

    def spy(job: profiling_cli.ProfileJob) -> tuple[TierProfile, Measurements]:
        profile, measurements = measure(job)
        captured.append(measurements)
        return profile, measurements

    measure = profiling_cli.measure
    out = tmp_path / "p.json"
    argv = ["profile", "--model", str(tiny_model_dir), "--device", "cpu", "--quick", "--engine"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profiling_cli, "measure", spy)
        assert main([*argv, "--max-tokens", "256", "--out", str(out)]) == 0
    assert not multiprocessing.active_children()
    (m,) = captured
    assert m.engine is not None
    assert m.prefill.lengths == m.engine.prefill.lengths == (32, 64, 128, 256)
    assert [(b, c) for b, c, _ in m.engine.decode.points] == [(b, c) for b, c, _ in m.decode.points]
    assert all(t > 0 for *_, t in m.engine.decode.points)
    profile = TierProfile.load(out)
    assert profile.engine is not None
    assert profile.engine.prefill_coeffs == pytest.approx(
        compute.fit_prefill(list(m.engine.prefill.lengths), list(m.engine.prefill.seconds))[0]
    )
    assert profile.engine.decode_coeffs == pytest.approx(compute.fit_decode(m.engine.decode.points))
    assert "--engine" in profile.source and "Engine: vLLM's LLMEngine" in profile.source
    assert "engine decode batch" in capsys.readouterr().out


def test_exit_code_from_the_command_line(tmp_path: Path) -> None:
    argv = ["profile", "--model", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "p")]
    done = subprocess.run(
        [sys.executable, "-m", "continuum_tiered.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"no model config at {tmp_path / 'config.json'}" in done.stderr
