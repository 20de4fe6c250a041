"""The summary table printed at the end of a profile, and the PNG of fits and points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from continuum_tiered.core.profile import TierProfile
from continuum_tiered.profiling.compute import DecodeResult, PrefillResult
from continuum_tiered.profiling.engine_steps import StepTimings
from continuum_tiered.profiling.measure import Series, Timed


@dataclass(frozen=True)
class Measurements:
    series: list[Series]
    tier_series: dict[str, Series]  # the reload series each profile tier was fitted on
    store_series: dict[str, Series]  # the series each tier's write bandwidth comes from
    duplex: list[Timed]  # each tier's directions timed under the other's load
    host_memcpy: Timed
    prefill: PrefillResult
    decode: DecodeResult
    notes: list[str]
    engine: StepTimings | None = None  # whole vLLM engine steps, when measured


def fit_errors(profile: TierProfile, m: Measurements) -> dict[str, float]:
    """Largest relative gap between each fit and the points it was fitted on."""
    errors = {
        f"{name} tier": _max_relative_error(
            series.seconds, [profile.tiers[name].transfer_time(n) for n in series.sizes]
        )
        for name, series in m.tier_series.items()
    }
    errors["prefill"] = _max_relative_error(
        m.prefill.seconds, [profile.prefill_time(n) for n in m.prefill.lengths]
    )
    errors["decode"] = _max_relative_error(
        [t for _, _, t in m.decode.points],
        [profile.decode_step_time(b, c) for b, c, _ in m.decode.points],
    )
    if m.engine is not None and profile.engine is not None:
        fit = profile.engine
        errors["engine prefill"] = _max_relative_error(
            m.engine.prefill.seconds, [fit.prefill_time(n) for n in m.engine.prefill.lengths]
        )
        errors["engine decode"] = _max_relative_error(
            [t for _, _, t in m.engine.decode.points],
            [fit.decode_step_time(b, c) for b, c, _ in m.engine.decode.points],
        )
    return errors


def _max_relative_error(measured: Sequence[float], fitted: Sequence[float]) -> float:
    return max(abs(f - t) / t for t, f in zip(measured, fitted, strict=True))


def summary(profile: TierProfile, m: Measurements, out: Path, png: Path) -> str:
    shape = profile.model
    lines = [
        f"model {shape.name} ({shape.shape_text()}): {shape.kv_bytes_per_token} KV bytes/token",
        "",
        _table(
            ["tier", "transfer", "sizes", "at largest", "backend"],
            [
                [
                    s.tier,
                    s.label + (" (reload)" if s.reload else ""),
                    f"{_bytes(s.sizes[0])} .. {_bytes(s.sizes[-1])}",
                    f"{s.large_size_bandwidth / 1e9:.2f} GB/s",
                    "/".join(sorted(set(s.backends))),
                ]
                for s in m.series
            ],
        ),
        "",
        _table(
            ["profile tier", "bytes", "measured", "fit"],
            [
                [name, _bytes(n), _ms(t), _ms(profile.tiers[name].transfer_time(n))]
                for name, series in m.tier_series.items()
                for n, t in zip(series.sizes, series.seconds, strict=True)
            ],
        ),
        *(
            f"{t.name} tier: {t.bandwidth_bytes_per_s / 1e9:.3f} GB/s, latency "
            f"{t.latency_s * 1e6:.1f} us, from {m.tier_series[t.name].label}; write "
            f"{t.write_bandwidth / 1e9:.3f} GB/s from {m.store_series[t.name].label}"
            for t in profile.tiers.values()
        ),
        "",
        _table(
            ["tier", "transfer at one size", "bytes", "bandwidth"],
            [
                [d.tier, d.label, _bytes(d.nbytes), f"{d.bandwidth / 1e9:.2f} GB/s"]
                for d in [*m.duplex, m.host_memcpy]
            ],
        ),
        "",
        figures_table(profile),
        "",
        _table(
            ["prefill tokens", "measured", "fit"],
            [
                [str(n), _ms(t), _ms(profile.prefill_time(n))]
                for n, t in zip(m.prefill.lengths, m.prefill.seconds, strict=True)
            ],
        ),
        "prefill t(n) = {:.4g} + {:.4g} n + {:.4g} n^2 s, {}".format(
            *profile.prefill_coeffs, m.prefill.method
        ),
        "",
        _table(
            ["decode batch", "context", "measured", "fit"],
            [
                [str(b), str(c), _ms(t), _ms(profile.decode_step_time(b, c))]
                for b, c, t in m.decode.points
            ],
        ),
        "decode t = {:.4g} + {:.4g} batch + {:.4g} batch*context s".format(*m.decode.coeffs),
        "",
        *_engine_lines(profile, m),
        "largest fit error: "
        + ", ".join(f"{k} {v:.0%}" for k, v in fit_errors(profile, m).items()),
        *m.notes,
        f"wrote {out} and {png}",
    ]
    return "\n".join(lines)


def figures_table(profile: TierProfile) -> str:
    """Every figure of the profile with its provenance ("-": none stated)."""
    data = profile.to_json()
    rows = []
    for path in profile.figure_paths():
        value: Any = data
        for key in path.split("."):
            value = value[key]
        rows.append([path, _figure(path, value), profile.provenance.get(path, "-")])
    return _table(["profile figure", "value", "provenance"], rows)


def _figure(path: str, value: float | list[float]) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
    if path.endswith("bytes_per_s"):
        return f"{value / 1e9:.3f} GB/s"
    return f"{value * 1e6:.1f} us"  # latency_s, request_overhead_s


def _engine_lines(profile: TierProfile, m: Measurements) -> list[str]:
    """The engine's measured steps next to the model-only fit at the same points."""
    if m.engine is None or profile.engine is None:
        return []
    fit = profile.engine
    prefill = _table(
        ["engine prefill tokens", "measured", "fit", "model-only fit"],
        [
            [str(n), _ms(t), _ms(fit.prefill_time(n)), _ms(profile.prefill_time(n))]
            for n, t in zip(m.engine.prefill.lengths, m.engine.prefill.seconds, strict=True)
        ],
    )
    decode = _table(
        ["engine decode batch", "context", "measured", "fit", "model-only fit"],
        [
            [
                str(b),
                str(c),
                _ms(t),
                _ms(fit.decode_step_time(b, c)),
                _ms(profile.decode_step_time(b, c)),
            ]
            for b, c, t in m.engine.decode.points
        ],
    )
    return [
        prefill,
        "engine prefill t(n) = {:.4g} + {:.4g} n + {:.4g} n^2 s".format(*fit.prefill_coeffs),
        "",
        decode,
        "engine decode t = {:.4g} + {:.4g} batch + {:.4g} batch*context s".format(
            *fit.decode_coeffs
        ),
        "",
    ]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, ["-" * w for w in widths], *rows]
    ]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} {units[i]}" if i == 0 else f"{n:.1f} {units[i]}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def plot(profile: TierProfile, m: Measurements, png: Path) -> None:
    """Prefill curve, transfer time against bytes per tier, decode lines per batch size."""
    fig = Figure(figsize=(17, 5), layout="constrained")
    FigureCanvasAgg(fig)
    prefill, transfers, decode = fig.subplots(1, 3)

    ns = np.linspace(1, max(m.prefill.lengths), 200)
    prefill.plot(m.prefill.lengths, m.prefill.seconds, "o", label="measured (median)")
    prefill.plot(ns, [profile.prefill_time(int(n)) for n in ns], "-", label="quadratic fit")
    if m.engine is not None and profile.engine is not None:
        engine = m.engine.prefill
        prefill.plot(engine.lengths, engine.seconds, "s", label="vLLM engine (median)")
        prefill.plot(ns, [profile.engine.prefill_time(n) for n in ns], "--", label="engine fit")
    prefill.set(xlabel="context tokens", ylabel="prefill time (s)", title="prefill")
    prefill.legend()

    for s in m.series:
        transfers.loglog(s.sizes, s.seconds, "o" if s.reload else "x", label=f"{s.tier}: {s.label}")
    for d in m.duplex:
        transfers.loglog([d.nbytes], [d.seconds], "*", label=f"{d.tier}: {d.label}")
    for name, s in m.tier_series.items():
        sizes = np.geomspace(s.sizes[0], s.sizes[-1], 100)
        tier = profile.tiers[name]
        transfers.loglog(sizes, [tier.transfer_time(n) for n in sizes], "-", label=f"{name} fit")
    transfers.set(xlabel="bytes", ylabel="time (s)", title="transfers")
    transfers.legend(fontsize="small")

    for batch in sorted({b for b, _, _ in m.decode.points}):
        row = [(c, t) for b, c, t in m.decode.points if b == batch]
        (line,) = decode.plot(*zip(*row, strict=True), "o", label=f"batch {batch}")
        contexts = np.linspace(0, max(c for c, _ in row), 50)
        fitted = [profile.decode_step_time(batch, c) for c in contexts]
        decode.plot(contexts, fitted, "-", color=line.get_color())
    decode.set(xlabel="context tokens", ylabel="step time (s)", title="decode step (lines: fit)")
    decode.legend()

    fig.suptitle(f"{profile.model.name} on {profile.device}, {profile.model.dtype_bytes}-byte KV")
    fig.savefig(png, dpi=100)
