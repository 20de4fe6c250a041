"""``continuum-tiered profile``: measure a device's tier bandwidths, prefill and decode.

Writes the versioned tier-profile JSON that ``serve --profile`` and the replay read, a PNG
of the fits next to it, and prints a summary table. Every input is checked before the
first measurement, so a bad flag fails in a second, not after minutes of profiling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig

from continuum_tiered.core.profile import (
    PROFILE_VERSION,
    EngineSteps,
    ModelShape,
    ProfileError,
    TierProfile,
)
from continuum_tiered.core.remote_tier import RemoteTierError, parse_remote_url
from continuum_tiered.core.tier_model import LMCACHE_CHUNK_TOKENS, TIER_ORDER
from continuum_tiered.profiling import compute, disk, engine_steps, remote, transfers
from continuum_tiered.profiling.measure import (
    BLOCK_TOKENS,
    FULL,
    MAX_CONTEXT_TOKENS,
    QUICK,
    Plan,
    ProfilingError,
    Series,
    Timed,
    available_host_bytes,
    fit_tier,
    load_note,
    max_transfer_tokens,
    transfer_tokens,
)
from continuum_tiered.profiling.report import Measurements, plot, summary

MIN_MAX_TOKENS = 64
TIERS_HELP = "cpu, disk:/path/to/dir, remote=redis://HOST:PORT"


@dataclass(frozen=True)
class TierRequest:
    name: str
    directory: Path | None = None  # where the disk tier writes its files
    url: str | None = None  # the remote tier's Redis server


@dataclass(frozen=True)
class ProfileJob:
    """Everything a run needs, checked."""

    hf_config: PretrainedConfig
    model_dir: Path  # the folder of config.json, for the vLLM engine
    shape: ModelShape
    device: str
    dtype: str
    tiers: list[TierRequest]
    max_tokens: int | None
    plan: Plan
    engine: bool  # also time whole steps of the vLLM engine
    out: Path
    command: str

    @property
    def png(self) -> Path:
        return self.out.with_suffix(".png")


def add_profile_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure tier bandwidths, prefill and decode time; write a tier profile",
        description="Measure the costs the TTL cost model needs on this machine and write "
        "them as a tier-profile JSON (plus a PNG of the fits next to it).",
    )
    p.add_argument("--model", required=True, help="HF config.json, or a directory holding one")
    p.add_argument("--device", required=True, choices=("cuda", "cpu"))
    p.add_argument(
        "--tiers",
        default="cpu",
        help="comma-separated tiers to measure: cpu, disk:/dir, remote=redis://HOST:PORT "
        "(default: cpu)",
    )
    p.add_argument("--dtype", default="bf16", choices=sorted(compute.DTYPES))
    p.add_argument(
        "--max-tokens",
        type=int,
        help="largest context measured (default: the model's, and 128k for transfers)",
    )
    p.add_argument("--quick", action="store_true", help="reduced grid, fewer repeats")
    p.add_argument(
        "--engine",
        action="store_true",
        help="also time whole steps of the vLLM engine serving the model (what the "
        "virtual-time replay then uses): scheduling, kernels, sampling, output processing",
    )
    p.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    p.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace, passthrough: list[str]) -> int:
    job = job_from_args(args)
    profile, measurements = measure(job)
    profile.save(job.out)
    plot(profile, measurements, job.png)
    print(summary(profile, measurements, job.out, job.png), flush=True)
    return 0


def job_from_args(args: argparse.Namespace) -> ProfileJob:
    check_device(args.device)
    config_path, config = load_config(Path(args.model))
    dtype_bytes = compute.DTYPES[args.dtype].itemsize
    name = config.get("_name_or_path") or config_path.parent.resolve().name
    try:
        shape = ModelShape.from_hf_config(config, dtype_bytes, name=str(name), strict=True)
        hf_config = compute.transformers_config(config)
    except (ProfileError, ProfilingError) as exc:
        raise ProfilingError(f"{config_path}: {exc}") from exc
    if args.max_tokens is not None and args.max_tokens < MIN_MAX_TOKENS:
        raise ProfilingError(f"--max-tokens must be at least {MIN_MAX_TOKENS}")
    tiers = parse_tiers(args.tiers)
    check_output(args.out)
    return ProfileJob(
        hf_config=hf_config,
        model_dir=config_path.parent,
        shape=shape,
        device=args.device,
        dtype=args.dtype,
        tiers=tiers,
        max_tokens=args.max_tokens,
        plan=QUICK if args.quick else FULL,
        engine=args.engine,
        out=args.out,
        command=command_line(args),
    )


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ProfilingError(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU; use --device cpu"
        )


def load_config(path: Path) -> tuple[Path, dict[str, object]]:
    config_path = path / "config.json" if path.is_dir() else path
    if not config_path.is_file():
        raise ProfilingError(f"--model: no model config at {config_path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ProfilingError(f"--model: cannot read {config_path} as JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ProfilingError(f"--model: {config_path} is not a JSON object")
    return config_path, config


def parse_tiers(text: str) -> list[TierRequest]:
    """``cpu``, ``disk:/dir`` and ``remote=redis://HOST:PORT`` (``:`` or ``=`` before a
    tier's argument, either way), each checked: a directory written to, a server that
    answers."""
    tiers = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, argument = _split_tier(item)
        if name not in TIER_ORDER:
            raise ProfilingError(f"--tiers: unknown tier {name!r}; known tiers: {TIERS_HELP}")
        if any(t.name == name for t in tiers):
            raise ProfilingError(f"--tiers: tier {name!r} given twice")
        if name == "cpu" and sep:
            raise ProfilingError(f"--tiers: the cpu tier takes no path, got {item!r}")
        if name == "disk":
            if not argument:
                raise ProfilingError("--tiers: the disk tier needs a directory: disk:/path")
            disk.check_directory(Path(argument))
            tiers.append(TierRequest(name, directory=Path(argument)))
        elif name == "remote":
            if not argument:
                raise ProfilingError(
                    "--tiers: the remote tier needs a URL: remote=redis://HOST:PORT"
                )
            try:
                url = parse_remote_url(argument)
            except RemoteTierError as error:
                raise ProfilingError(f"--tiers: {error}") from None
            remote.check_server(url)
            tiers.append(TierRequest(name, url=url))
        else:
            tiers.append(TierRequest(name))
    if not tiers:
        raise ProfilingError(f"--tiers: name at least one tier ({TIERS_HELP})")
    return tiers


def _split_tier(item: str) -> tuple[str, str, str]:
    """``name``, the separator and the argument of ``name:arg`` or ``name=arg``."""
    cut = min((i for i in (item.find(":"), item.find("=")) if i >= 0), default=len(item))
    return item[:cut], item[cut : cut + 1], item[cut + 1 :]


def check_output(out: Path) -> None:
    """Refuse an output the profile (and its PNG) could not be written to."""
    if out.suffix == ".png":
        raise ProfilingError(f"--out {out}: the PNG goes next to the JSON; name the JSON file")
    if out.is_dir():
        raise ProfilingError(f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise ProfilingError(f"--out {out}: directory {out.parent} does not exist")
    try:
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ProfilingError(f"--out {out}: cannot write in {out.parent}: {exc}") from exc
    for path in (out, out.with_suffix(".png")):
        if path.exists() and not os.access(path, os.W_OK):
            raise ProfilingError(f"--out: {path} exists and is not writable")


def command_line(args: argparse.Namespace) -> str:
    """The command, every option spelled out, so the profile says how to redo it."""
    words = ["continuum-tiered", "profile", "--model", args.model, "--device", args.device]
    words += ["--tiers", args.tiers, "--dtype", args.dtype]
    if args.max_tokens is not None:
        words += ["--max-tokens", str(args.max_tokens)]
    if args.quick:
        words.append("--quick")
    if args.engine:
        words.append("--engine")
    return shlex.join([*words, "--out", str(args.out)])


def measure(job: ProfileJob) -> tuple[TierProfile, Measurements]:
    series, duplex, notes = _measure_tiers(job)
    host_memcpy = transfers.measure_host_memcpy(job.plan.transfer_repeats)
    prefill, decode = _measure_compute(job)
    engine_result = _measure_engine(job, prefill, decode) if job.engine else None
    measurements = Measurements(
        series=series,
        tier_series=_fastest(series, job.tiers, reload=True),
        store_series=_fastest(series, job.tiers, reload=False),
        duplex=duplex,
        host_memcpy=host_memcpy,
        prefill=prefill,
        decode=decode,
        notes=notes,
        engine=engine_result,
    )
    tiers = {
        name: fit_tier(
            name,
            load,
            measurements.store_series[name],
            [d for d in duplex if d.tier == name],
        )
        for name, load in measurements.tier_series.items()
    }
    profile = TierProfile(
        version=PROFILE_VERSION,
        model=job.shape,
        device=job.device,
        tiers=tiers,
        prefill_coeffs=prefill.coeffs,
        source=_source(job, measurements),
        decode_coeffs=decode.coeffs,
        engine=engine_result
        and EngineSteps(engine_result.prefill.coeffs, engine_result.decode.coeffs),
        host_memcpy_bytes_per_s=host_memcpy.bandwidth,
    )
    profile = replace(profile, provenance=dict.fromkeys(profile.figure_paths(), "measured"))
    # What we write must load: run the reader's checks now, not when a server starts.
    return TierProfile.from_json(profile.to_json(), job.shape, job.device), measurements


def _fastest(series: list[Series], tiers: list[TierRequest], reload: bool) -> dict[str, Series]:
    """Each tier's fastest series in one direction (e.g. pinned over pageable memory)."""
    return {
        t.name: max(
            (s for s in series if s.tier == t.name and s.reload == reload),
            key=lambda s: s.large_size_bandwidth,
        )
        for t in tiers
    }


def _measure_tiers(job: ProfileJob) -> tuple[list[Series], list[Timed], list[str]]:
    kv = job.shape.kv_bytes_per_token
    block = BLOCK_TOKENS[job.device]

    def sizes(budget_bytes: float) -> list[int]:
        top = max_transfer_tokens(kv, block, job.max_tokens, budget_bytes)
        return [n * kv for n in transfer_tokens(block, top, job.plan.size_step)]

    series: list[Series] = []
    duplex: list[Timed] = []
    notes = [load_note()]
    for tier in job.tiers:
        result: transfers.TransferResult | disk.DiskResult | remote.RemoteResult
        if tier.directory is not None:
            budget = min(disk.disk_budget_bytes(tier.directory), available_host_bytes() / 4)
            result = disk.measure_disk(tier.directory, sizes(budget), job.plan.disk_repeats)
        elif tier.url is not None:
            # The server's memory bounds what it holds; where it runs here, so does ours.
            budget = min(
                remote.remote_budget_bytes(tier.url) or math.inf, available_host_bytes() / 4
            )
            chunk_bytes = LMCACHE_CHUNK_TOKENS * kv
            result = remote.measure_remote(
                tier.url, sizes(budget), chunk_bytes, job.plan.transfer_repeats
            )
        else:
            result = transfers.measure_transfers(
                job.device, sizes(_copy_budget(job.device)), job.plan.transfer_repeats
            )
        series += result.series
        duplex += result.duplex
        notes += result.notes
    return series, duplex, notes


def _measure_compute(job: ProfileJob) -> tuple[compute.PrefillResult, compute.DecodeResult]:
    model = compute.build_model(job.hf_config, job.dtype, job.device)
    longest = min(
        compute.max_context(job.hf_config) or MAX_CONTEXT_TOKENS,
        job.max_tokens or MAX_CONTEXT_TOKENS,
    )
    lengths = compute.prefill_lengths(longest, job.plan.prefill_points)
    prefill = compute.measure_prefill(model, lengths, job.plan.prefill_repeats, job.device)
    grid = compute.decode_grid(
        job.plan.decode_batches,
        compute.spread(list(prefill.lengths), job.plan.decode_contexts),
        job.shape.kv_bytes_per_token,
        _kv_budget(job.device),
    )
    decode = compute.measure_decode(model, job.shape, grid, job.plan.decode_repeats, job.device)
    return prefill, decode


def _measure_engine(
    job: ProfileJob, prefill: compute.PrefillResult, decode: compute.DecodeResult
) -> engine_steps.StepTimings:
    """The engine at the points the model was measured at, once the model is freed."""
    if job.device == "cuda":
        torch.cuda.empty_cache()
    text = job.hf_config.get_text_config()
    setup = engine_steps.StepTimingSetup(
        job.model_dir, job.device, job.dtype, text.vocab_size, text.max_position_embeddings
    )
    grid = [(b, c) for b, c, _ in decode.points]
    plan = job.plan
    return engine_steps.measure_engine(
        setup, list(prefill.lengths), grid, plan.prefill_repeats, plan.decode_repeats
    )


def _copy_budget(device: str) -> float:
    """Largest buffer per copy endpoint: the host holds up to three (pinned, pageable, CuPy)."""
    if device == "cuda":
        return min(available_host_bytes() / 6, torch.cuda.mem_get_info()[0] / 2)
    return available_host_bytes() / 4


def _kv_budget(device: str) -> float:
    """Room for one decode point's random KV cache, with the model already loaded."""
    if device == "cuda":
        torch.cuda.empty_cache()  # what prefill left in torch's cache is free for this
        return torch.cuda.mem_get_info()[0] / 2
    return available_host_bytes() / 2


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                "unknown CPU",
            )
    except OSError:
        model = "unknown CPU"
    return f"{model} ({os.cpu_count()} CPUs)"


def _source(job: ProfileJob, m: Measurements) -> str:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    plan = job.plan
    tiers = "; ".join(_tier_source(name, s, m) for name, s in m.tier_series.items())
    return (
        f"Measured by `{job.command}` on {device_name(job.device)}, {date}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}. {tiers}. "
        + "; ".join(m.notes)
        + f"; host memcpy = {m.host_memcpy.label} of {m.host_memcpy.nbytes} bytes, median "
        f"of {plan.transfer_repeats}. Every figure is measured (see provenance)"
        + f". Prefill: random-weight {job.dtype} model, median of {plan.prefill_repeats} runs "
        f"after a warm-up at {', '.join(map(str, m.prefill.lengths))} tokens, "
        f"{m.prefill.method}. Decode: one step over a static cache of random KV, median of "
        f"{plan.decode_repeats} steps at (batch, context) "
        + ", ".join(f"({b}, {c})" for b, c, _ in m.decode.points)
        + ", nonnegative least squares."
        + (_engine_source(m.engine) if m.engine else "")
    )


def _tier_source(name: str, s: Series, m: Measurements) -> str:
    store = m.store_series[name]
    duplex = [d.label for d in m.duplex if d.tier == name]
    contended = duplex[0] if len(duplex) == 1 else "the slower of " + " and ".join(duplex)
    return (
        f"{name} tier: bandwidth = {s.label} ({'/'.join(sorted(set(s.backends)))}) throughput "
        f"at {s.sizes[-1]} bytes, latency = intercept fitted over {len(s.sizes)} sizes "
        f"from {s.sizes[0]} bytes, write bandwidth = {store.label} at {store.sizes[-1]} "
        f"bytes, duplex bandwidth = {contended}, both with that latency taken off"
    )


def _engine_source(result: engine_steps.StepTimings) -> str:
    return (
        " Engine: vLLM's LLMEngine (engine-core and worker processes, no HTTP) with the "
        "random-weight model, prefill = submit to first token of one prompt (median), "
        f"{result.prefill.method}; decode = median of {engine_steps.DECODE_WINDOW}-step windows "
        "at the decode points, nonnegative least squares."
    )
