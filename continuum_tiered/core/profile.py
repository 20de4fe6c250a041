"""The tier profile: measured (or estimated) costs that feed the TTL cost model.

A profile names the model shape and device kind it was measured for, the bandwidth and
latency of each KV tier below the GPU (CPU memory, disk) with, optionally, its store
bandwidth and its bandwidth under concurrent loads and stores, optionally the host's
memory copy bandwidth, a quadratic fit of prefill time against context length and,
optionally, a fit of decode step time against batch size and context length and,
optionally, the same two fits of the serving engine's whole steps. ``provenance`` says,
per figure, whether it was published, measured, assumed or derived. It is stored as
versioned JSON; loading validates every field and refuses a profile measured for another
model shape or device kind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from continuum_tiered.core.model_shapes import attention_dims, config_name

PROFILE_VERSION = 1
BUILTIN_DIR = Path(__file__).parents[1] / "data" / "profiles"
_DEFAULT_BY_DEVICE = {"cpu": "cpu-tiny-llama", "cuda": "h100-llama-3.1-8b"}
_CHECK_MAX_TOKENS = 1_000_000
_REFINEMENTS = 4  # the first round is the plain solve
PROVENANCES = ("published", "measured", "assumed", "derived")
_T = TypeVar("_T")


class ProfileError(ValueError):
    pass


class ProfileMismatchError(ProfileError):
    """A profile measured for another model shape than the one served."""


# A profile as a deployment names it: a built-in name, a file path, or the profile's JSON
# itself (a caller that already loaded it).
ProfileRef = str | Mapping[str, object]


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def shape_text(self) -> str:
        return "layers={}, kv_heads={}, head_dim={}, dtype_bytes={}".format(*self.shape)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """What a profile depends on: the KV layout, not the name."""
        return (self.num_layers, self.num_kv_heads, self.head_dim, self.dtype_bytes)

    @classmethod
    def from_hf_config(
        cls,
        config: dict[str, object],
        dtype_bytes: int = 2,
        name: str | None = None,
        strict: bool = False,
    ) -> ModelShape:
        """Read the shape from a Hugging Face ``config.json`` (its ``text_config`` if nested),
        under any family's field names (:mod:`continuum_tiered.core.model_shapes`); a field that no
        name is found for is assumed, with a warning naming it and the value. ``strict``
        (the profiler, which builds the model) raises :class:`ProfileError` instead."""
        name = name or config_name(config)
        dims = attention_dims(config, name)
        if strict and dims.assumed:
            missing = ", ".join(repr(field) for field in dims.assumed)
            raise ProfileError(f"HF config is missing {missing}")
        return cls(
            name=name,
            num_layers=dims.num_layers,
            num_kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            dtype_bytes=_positive_int(dtype_bytes, "dtype_bytes"),
        )


def prefill_increment(coeffs: tuple[float, float, float], offset: int, n: int) -> float:
    """Prefill of ``n`` new tokens after ``offset`` cached ones on the curve
    t(n) = c0 + c1 n + c2 n^2: linear work for the new tokens plus their attention over
    the whole context (the fixed c0 is the step's, not the tokens')."""
    _, c1, c2 = coeffs
    end = offset + n
    return c1 * n + c2 * (end * end - offset * offset)


@dataclass(frozen=True)
class Tier:
    """A KV tier below the GPU. ``bandwidth_bytes_per_s`` is the load direction (the one
    that brings KV back: host->device for ``cpu``, disk->host for ``disk``)."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float
    # The store direction (device->host for cpu, host->disk for disk); None: as the load.
    write_bandwidth_bytes_per_s: float | None = None
    # Each direction's bandwidth while loads and stores run at once (cpu: concurrent
    # host->device and device->host copies; disk: reads under a write load); None: no
    # contention, each direction keeps its one-direction figure.
    duplex_bandwidth_bytes_per_s: float | None = None

    @property
    def write_bandwidth(self) -> float:
        if self.write_bandwidth_bytes_per_s is None:
            return self.bandwidth_bytes_per_s
        return self.write_bandwidth_bytes_per_s

    @property
    def duplex_bandwidth(self) -> float:
        """The load direction's bandwidth while stores run too. Never above the
        one-direction figure: a measured duplex figure can exceed it (another thread,
        timing noise), but contention does not speed a transfer up."""
        return _contended(self.bandwidth_bytes_per_s, self.duplex_bandwidth_bytes_per_s)

    @property
    def duplex_write_bandwidth(self) -> float:
        """The store direction's bandwidth while loads run too."""
        return _contended(self.write_bandwidth, self.duplex_bandwidth_bytes_per_s)

    def transfer_time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s

    def write_time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.write_bandwidth

    def to_json(self) -> dict[str, float]:
        """The tier's figures; the optional ones only when known (older files stay as they were)."""
        data = {"bandwidth_bytes_per_s": self.bandwidth_bytes_per_s, "latency_s": self.latency_s}
        if self.write_bandwidth_bytes_per_s is not None:
            data["write_bandwidth_bytes_per_s"] = self.write_bandwidth_bytes_per_s
        if self.duplex_bandwidth_bytes_per_s is not None:
            data["duplex_bandwidth_bytes_per_s"] = self.duplex_bandwidth_bytes_per_s
        return data


def _contended(one_direction: float, duplex: float | None) -> float:
    return one_direction if duplex is None else min(one_direction, duplex)


@dataclass(frozen=True)
class EngineSteps:
    """Step times of the serving engine (vLLM with this model on this device), fitted like
    the model-only curves: what a request waits for, with scheduling, input preparation,
    the engine's own kernels, sampling and output processing included."""

    prefill_coeffs: tuple[float, float, float]  # one request's prefill step, admission included
    decode_coeffs: tuple[float, float, float]
    # Each turn's time outside the engine, as its program sees it: HTTP, the API server's
    # request and response handling, streaming, the client's own work. 0: not measured.
    request_overhead_s: float = 0.0

    def prefill_time(self, n_tokens: int) -> float:
        c0, c1, c2 = self.prefill_coeffs
        return c0 + c1 * n_tokens + c2 * n_tokens * n_tokens

    def decode_step_time(self, batch: int, context_tokens: float) -> float:
        d0, d1, d2 = self.decode_coeffs
        return d0 + d1 * batch + d2 * batch * context_tokens

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "prefill_coeffs": list(self.prefill_coeffs),
            "decode_coeffs": list(self.decode_coeffs),
        }
        if self.request_overhead_s:
            data["request_overhead_s"] = self.request_overhead_s
        return data


@dataclass(frozen=True)
class TierProfile:
    version: int
    model: ModelShape
    device: str  # device kind: "cuda", "cpu"
    tiers: dict[str, Tier]
    prefill_coeffs: tuple[float, float, float]  # t(n) = c0 + c1*n + c2*n^2 seconds
    source: str  # how the numbers were obtained
    # t = d0 + d1*batch + d2*batch*context seconds per decode step; None when not measured
    decode_coeffs: tuple[float, float, float] | None = None
    engine: EngineSteps | None = None  # None when not measured
    # One thread's host memory copy bandwidth: what a buffered disk read or write costs
    # the host. None when not known.
    host_memcpy_bytes_per_s: float | None = None
    # A figure's JSON path (see figure_paths) -> one of PROVENANCES; figures not named
    # have no stated provenance (the source text may still say).
    provenance: dict[str, str] = field(default_factory=dict)

    def figure_paths(self) -> list[str]:
        """The JSON paths of the figures this profile holds: what ``provenance`` can name."""
        paths = [
            f"tiers.{name}.{key}" for name, tier in self.tiers.items() for key in tier.to_json()
        ]
        if self.host_memcpy_bytes_per_s is not None:
            paths.append("host_memcpy_bytes_per_s")
        paths.append("prefill_coeffs")
        if self.decode_coeffs is not None:
            paths.append("decode_coeffs")
        if self.engine is not None:
            paths += [f"engine.{key}" for key in self.engine.to_json()]
        return paths

    @property
    def serving_prefill_coeffs(self) -> tuple[float, float, float]:
        """The engine's prefill curve when measured (what a request waits for), else the
        model-only one."""
        return self.engine.prefill_coeffs if self.engine is not None else self.prefill_coeffs

    def prefill_time(self, n_tokens: int) -> float:
        if n_tokens <= 0:
            return 0.0
        c0, c1, c2 = self.prefill_coeffs
        return max(0.0, c0 + c1 * n_tokens + c2 * n_tokens * n_tokens)

    def decode_step_time(self, batch: int, context_tokens: float) -> float:
        """One decode step of ``batch`` sequences of ``context_tokens`` tokens each (mean).

        ``batch * context_tokens`` is the KV the step reads.
        """
        if self.decode_coeffs is None:
            raise ProfileError(
                "this profile has no decode_coeffs; measure them with `continuum-tiered profile`"
            )
        if batch < 1 or context_tokens < 0:
            raise ProfileError(
                f"decode step needs batch >= 1 and context_tokens >= 0, "
                f"got batch={batch}, context_tokens={context_tokens}"
            )
        d0, d1, d2 = self.decode_coeffs
        return d0 + d1 * batch + d2 * batch * context_tokens

    def reload_time(self, tier_name: str, n_tokens: int) -> float:
        tier = self.tiers.get(tier_name)
        if tier is None:
            known = ", ".join(sorted(self.tiers)) or "none"
            raise ProfileError(f"unknown tier {tier_name!r}; this profile has: {known}")
        return tier.transfer_time(n_tokens * self.model.kv_bytes_per_token)

    def reload_or_prefill(self, n_tokens: int, tier: str | None) -> float:
        """Cost of getting the KV back: the cheaper of reloading from ``tier`` and prefill."""
        prefill = self.prefill_time(n_tokens)
        return prefill if tier is None else min(self.reload_time(tier, n_tokens), prefill)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "version": self.version,
            "model": asdict(self.model),
            "device": self.device,
            "tiers": {name: t.to_json() for name, t in self.tiers.items()},
            "prefill_coeffs": list(self.prefill_coeffs),
            "source": self.source,
        }
        if self.decode_coeffs is not None:
            data["decode_coeffs"] = list(self.decode_coeffs)
        if self.engine is not None:
            data["engine"] = self.engine.to_json()
        if self.host_memcpy_bytes_per_s is not None:
            data["host_memcpy_bytes_per_s"] = self.host_memcpy_bytes_per_s
        # Not the provenance of figures replaced away (dataclasses.replace of a tier with
        # fewer figures): the file would not load.
        figures = set(self.figure_paths())
        provenance = {path: kind for path, kind in self.provenance.items() if path in figures}
        if provenance:
            data["provenance"] = provenance
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(
        cls,
        d: object,
        expect_model: ModelShape | None = None,
        expect_device: str | None = None,
    ) -> TierProfile:
        """Build a profile from parsed JSON; ProfileError names the first bad field's path.

        With ``expect_model`` / ``expect_device``, also refuse a profile measured for
        another model shape or device kind.
        """
        profile = cls._parse(d)
        profile._check_target("profile", expect_model, expect_device)
        return profile

    @classmethod
    def _parse(cls, d: object) -> TierProfile:
        root = _object(d, "$")
        version = _get(root, "$", "version", _positive_int)
        if version != PROFILE_VERSION:
            raise ProfileError(
                f"$.version: got {version!r}, this code reads version {PROFILE_VERSION}"
            )
        m = _get(root, "$", "model", _object)
        model = ModelShape(
            name=_get(m, "$.model", "name", _string),
            **{
                key: _get(m, "$.model", key, _positive_int)
                for key in ("num_layers", "num_kv_heads", "head_dim", "dtype_bytes")
            },
        )
        tiers = {
            name: _tier(name, _object(raw, f"$.tiers.{name}"))
            for name, raw in _get(root, "$", "tiers", _object).items()
        }
        profile = cls(
            version=version,
            model=model,
            device=_get(root, "$", "device", _string),
            tiers=tiers,
            prefill_coeffs=_get(root, "$", "prefill_coeffs", _prefill_coeffs),
            source=_get(root, "$", "source", _string),
            decode_coeffs=_decode_coeffs(root.get("decode_coeffs")),
            engine=_engine_steps(root.get("engine")),
            host_memcpy_bytes_per_s=_optional_bandwidth(root, "$", "host_memcpy_bytes_per_s"),
        )
        provenance = _provenance(root.get("provenance"), set(profile.figure_paths()))
        return replace(profile, provenance=provenance)

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect_model: ModelShape | None = None,
        expect_device: str | None = None,
    ) -> TierProfile:
        """Read and validate a profile file; refuse one measured for another model or device."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from exc
        try:
            profile = cls._parse(data)
        except ProfileError as exc:
            raise ProfileError(f"profile {path}: {exc}") from exc
        profile._check_target(f"profile {path}", expect_model, expect_device)
        return profile

    def _check_target(
        self, label: str, expect_model: ModelShape | None, expect_device: str | None
    ) -> None:
        if expect_model is not None and self.model.shape != expect_model.shape:
            raise ProfileMismatchError(
                f"{label} was measured for model {self.model.name} "
                f"(shape {self.model.shape_text()}) but the server runs "
                f"{expect_model.name} (shape {expect_model.shape_text()})"
            )
        if expect_device is not None and self.device != expect_device:
            raise ProfileError(
                f"{label} was measured on device {self.device!r} "
                f"but the server runs on {expect_device!r}"
            )


def _get(obj: dict[str, object], path: str, key: str, check: Callable[[object, str], _T]) -> _T:
    """``obj[key]`` validated by ``check``; errors name the field's JSON path."""
    if key not in obj:
        raise ProfileError(f"{path}.{key}: missing")
    return check(obj[key], f"{path}.{key}")


def _object(value: object, path: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ProfileError(f"{path}: got {value!r}, expected an object")
    return value


def _list(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise ProfileError(f"{path}: got {value!r}, expected a list")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProfileError(f"{path}: got {value!r}, expected a non-empty string")
    return value


def _positive_int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ProfileError(f"{path}: got {value!r}, expected a positive integer")
    return value


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{path}: got {value!r}, expected a finite number")
    return float(value)


def _tier(name: str, t: dict[str, object]) -> Tier:
    path = f"$.tiers.{name}"
    bandwidth = _get(t, path, "bandwidth_bytes_per_s", _number)
    latency = _get(t, path, "latency_s", _number)
    if bandwidth <= 0:
        raise ProfileError(f"{path}.bandwidth_bytes_per_s: must be > 0, got {bandwidth}")
    if latency < 0:
        raise ProfileError(f"{path}.latency_s: must be >= 0, got {latency}")
    return Tier(
        name,
        bandwidth,
        latency,
        _optional_bandwidth(t, path, "write_bandwidth_bytes_per_s"),
        _optional_bandwidth(t, path, "duplex_bandwidth_bytes_per_s"),
    )


def _optional_bandwidth(obj: dict[str, object], path: str, key: str) -> float | None:
    """Absent or null: not known. Else a finite number > 0."""
    if obj.get(key) is None:
        return None
    value = _get(obj, path, key, _number)
    if value <= 0:
        raise ProfileError(f"{path}.{key}: must be > 0, got {value}")
    return value


def _provenance(raw: object, figures: set[str]) -> dict[str, str]:
    """Optional: absent or null means none stated. Keys name figures the profile holds."""
    if raw is None:
        return {}
    provenance = _object(raw, "$.provenance")
    for key, value in provenance.items():
        if key not in figures:
            known = ", ".join(sorted(figures))
            raise ProfileError(
                f"$.provenance.{key}: names no figure of this profile; its figures: {known}"
            )
        if value not in PROVENANCES:
            raise ProfileError(
                f"$.provenance.{key}: got {value!r}, expected one of {', '.join(PROVENANCES)}"
            )
    return dict(provenance)


def _prefill_coeffs(value: object, path: str) -> tuple[float, float, float]:
    raw = _list(value, path)
    if len(raw) != 3:
        raise ProfileError(f"{path}: got {raw!r}, expected [c0, c1, c2]")
    c0, c1, c2 = (_number(c, f"{path}[{i}]") for i, c in enumerate(raw))
    _check_prefill_nonnegative(c0, c1, c2, path)
    return c0, c1, c2


def _check_prefill_nonnegative(c0: float, c1: float, c2: float, path: str) -> None:
    """t(n) must not be negative on [1, 1e6]: check both ends and the vertex."""
    points = [1.0, float(_CHECK_MAX_TOKENS)]
    if c2 > 0 and 1 < -c1 / (2 * c2) < _CHECK_MAX_TOKENS:
        points.append(-c1 / (2 * c2))
    for n in points:
        if c0 + c1 * n + c2 * n * n < 0:
            raise ProfileError(
                f"{path}: t(n) = {c0} + {c1}*n + {c2}*n^2 is negative at n = {n:.0f}"
            )


def _decode_coeffs(raw: object, path: str = "$.decode_coeffs") -> tuple[float, float, float] | None:
    """Optional in version 1: absent or null means not measured."""
    if raw is None:
        return None
    values = _list(raw, path)
    if len(values) != 3:
        raise ProfileError(f"{path}: got {values!r}, expected [d0, d1, d2]")
    d0, d1, d2 = (_number(d, f"{path}[{i}]") for i, d in enumerate(values))
    for i, d in enumerate((d0, d1, d2)):
        # Each term is a cost (per step, per sequence, per KV token read): none can be negative.
        if d < 0:
            raise ProfileError(
                f"{path}[{i}]: must be >= 0 in t = d0 + d1*batch + d2*batch*context, got {d}"
            )
    return d0, d1, d2


def _engine_steps(raw: object) -> EngineSteps | None:
    """Optional in version 1: absent or null means not measured."""
    if raw is None:
        return None
    engine = _object(raw, "$.engine")
    decode = _get(engine, "$.engine", "decode_coeffs", _decode_coeffs)
    if decode is None:
        raise ProfileError("$.engine.decode_coeffs: got None, expected [d0, d1, d2]")
    # Optional: absent means not measured.
    overhead = _number(engine.get("request_overhead_s", 0.0), "$.engine.request_overhead_s")
    if overhead < 0:
        raise ProfileError(f"$.engine.request_overhead_s: must be >= 0, got {overhead}")
    prefill = _get(engine, "$.engine", "prefill_coeffs", _prefill_coeffs)
    return EngineSteps(prefill, decode, overhead)


def fit_quadratic(ns: Sequence[float], ts: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares (c0, c1, c2) of t = c0 + c1*n + c2*n^2.

    Solves the normal equations in pure Python, with n divided by its largest magnitude,
    then refines the solution on its residuals: the normal equations square the
    conditioning, and contexts clustered at one end of the range would otherwise lose
    the fit at the other end.
    """
    if len(ns) != len(ts):
        raise ProfileError(f"got {len(ns)} lengths but {len(ts)} times")
    if len(set(ns)) < 3:
        raise ProfileError("a quadratic fit needs at least 3 distinct context lengths")
    scale = max(abs(n) for n in ns)
    xs = [n / scale for n in ns]
    power_sums = [math.fsum(x**k for x in xs) for k in range(5)]
    matrix = [[power_sums[i + j] for j in range(3)] for i in range(3)]
    coeffs = [0.0, 0.0, 0.0]
    for _ in range(_REFINEMENTS):
        residuals = [
            math.fsum((t, -coeffs[0], -coeffs[1] * x, -coeffs[2] * x * x))
            for x, t in zip(xs, ts, strict=True)
        ]
        rhs = [math.fsum(r * x**i for x, r in zip(xs, residuals, strict=True)) for i in range(3)]
        coeffs = [c + d for c, d in zip(coeffs, _solve3(matrix, rhs), strict=True)]
    b0, b1, b2 = coeffs
    return b0, b1 / scale, b2 / (scale * scale)


def _solve3(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting on a 3x3 system."""
    rows = [[*a[i], b[i]] for i in range(3)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(rows[r][col]))
        if rows[pivot][col] == 0:
            raise ProfileError("singular system in quadratic fit")
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, 3):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [v - factor * p for v, p in zip(rows[r], rows[col], strict=True)]
    solution = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        known = sum(rows[r][c] * solution[c] for c in range(r + 1, 3))
        solution[r] = (rows[r][3] - known) / rows[r][r]
    return solution


def builtin_profile_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def load_named_profile(
    name_or_path: str,
    expect_model: ModelShape | None = None,
    expect_device: str | None = None,
) -> TierProfile:
    """Load a built-in profile by name (file stem under ``profiles/``) or a profile file."""
    builtin = BUILTIN_DIR / f"{name_or_path}.json"
    if "/" not in name_or_path and builtin.is_file():
        return TierProfile.load(builtin, expect_model, expect_device)
    if Path(name_or_path).is_file():
        return TierProfile.load(name_or_path, expect_model, expect_device)
    raise ProfileError(
        f"no built-in profile named {name_or_path!r} and no such file; "
        f"built-in profiles: {', '.join(builtin_profile_names())}"
    )


def load_profile(
    ref: ProfileRef,
    expect_model: ModelShape | None = None,
    expect_device: str | None = None,
) -> TierProfile:
    """:func:`load_named_profile`, or a profile given as its JSON."""
    if isinstance(ref, Mapping):
        return TierProfile.from_json(dict(ref), expect_model, expect_device)
    return load_named_profile(ref, expect_model, expect_device)


def default_profile(device: str = "cpu") -> TierProfile:
    """The built-in profile for a device kind: the H100 one derived from published kernel
    tables, the CPU one a roofline estimate of the tiny test model."""
    name = _DEFAULT_BY_DEVICE.get(device)
    if name is None:
        raise ProfileError(
            f"no default profile for device {device!r}; known: {', '.join(_DEFAULT_BY_DEVICE)}"
        )
    return load_named_profile(name)
