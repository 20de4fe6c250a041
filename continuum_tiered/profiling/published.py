"""A tier profile derived from published kernel measurements instead of a local run.

The ``aiconfigurator-core`` wheel (0.12.0) ships kernel latencies that NVIDIA measured on
an H100 SXM (80 GB HBM3) under vLLM 0.24.0: bf16 GEMMs over an (m, n, k) grid,
FlashAttention-3 prefill ("context") attention over context lengths up to 16k, FA3
decode ("generation") attention over batch sizes and context lengths, and vLLM's custom
all-reduce over message sizes. Latencies are in milliseconds. This module reads those
tables straight from the wheel (``pyarrow`` and ``yaml`` are imported lazily: only the
derivation needs them) and composes a Llama forward pass from them.

Modelling choices:

- A layer runs four GEMMs with ``m`` = tokens in the step: qkv ``hidden -> (heads +
  2 kv_heads) head_dim``, o ``heads head_dim -> hidden``, gate_up ``hidden -> 2
  intermediate`` and down ``intermediate -> hidden``. The lm_head ``hidden -> vocab /
  tp`` runs on the last token of a prefill and on every sequence of a decode step.
- GEMM times are interpolated trilinearly (linear in each of m, n, k between grid
  points): a GEMM's time is close to affine in each dimension both when it is bound by
  the weights it reads and when it is bound by FLOPs, and trilinear interpolation is
  exact for such functions. Past the largest measured m (32768) or n (65536) the time is
  scaled in proportion, as a GEMM that large is compute-bound.
- Prefill attention is the batch-1, bf16-KV, full-window FA3 row for the model's heads,
  KV heads and head dim, interpolated log-log in the context length; past the largest
  measured length (16384) it grows as n^2, the causal FLOP count.
- Prefill is one unchunked step of n tokens; vLLM chunks long prompts by its token
  budget, which leaves the GEMM work (linear in m at that size) and the causal attention
  FLOPs unchanged.
- Decode steps are sampled only where the generation-attention table has a measurement
  (context = step + 1), so decode attention is never interpolated.
- With tensor parallelism each layer pays two all-reduces of ``m * hidden`` bf16 values
  (after o and after down): vLLM's custom all-reduce measured eagerly for a prefill and
  under CUDA graphs for a decode step, linear in bytes between measured sizes and
  proportional past the largest.
- Only these kernels are counted: norms, rotary embedding, activation, sampling and the
  CPU side of a step (scheduling, launch) are not, so the figures are lower bounds.

The tiers come from the package's nominal PCIe figure (per direction, so for loads and
stores alike) and from stated assumptions; ``h100_profile`` builds a profile from the
kernel fits and that figure alone, so the tiers can be redone without the wheel.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.model_shapes import attention_dims
from continuum_tiered.core.profile import (
    PROFILE_VERSION,
    ModelShape,
    Tier,
    TierProfile,
    fit_quadratic,
)
from continuum_tiered.profiling.measure import nonnegative_lstsq

AIC_VERSION = "0.12.0"
VLLM_VERSION = "0.24.0"
_SYSTEMS = "aiconfigurator_core/systems"
_DATA = f"{_SYSTEMS}/data/h100_sxm"
SYSTEM_YAML = f"{_SYSTEMS}/h100_sxm.yaml"
GEMM_TABLE = f"{_DATA}/gemm/vllm/{VLLM_VERSION}/gemm_perf.parquet"
CONTEXT_TABLE = f"{_DATA}/attention/vllm/{VLLM_VERSION}/context_attention_perf.parquet"
GENERATION_TABLE = f"{_DATA}/attention/vllm/{VLLM_VERSION}/generation_attention_perf.parquet"
ALLREDUCE_TABLE = f"{_DATA}/comm/vllm/{VLLM_VERSION}/custom_allreduce_perf.parquet"

ATTENTION_KERNEL = "vllm_flash_attn_fa3"
PREFILL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DECODE_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
# Assumptions, not in the package: host<->device copy latency, each direction's share of
# the PCIe figure when both directions run at once, one local NVMe drive (read, write,
# read under a concurrent write) and one thread's host memcpy.
CPU_TIER_LATENCY_S = 20e-6
PCIE_DUPLEX_SHARE = 0.8
DISK_TIER = Tier("disk", 2e9, 100e-6, 1.5e9, 1e9)
HOST_MEMCPY_BYTES_PER_S = 10e9
_MS = 1e-3
_BF16_BYTES = 2


@dataclass(frozen=True)
class LlamaShare:
    """One GPU's share of a Llama: the HF config of the share plus its TP degree."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tp: int

    @classmethod
    def from_hf_config(cls, hf: dict, tp: int) -> LlamaShare:
        dims = attention_dims(hf)
        return cls(
            hidden=dims.hidden_size,
            intermediate=hf["intermediate_size"],
            heads=dims.num_heads,
            kv_heads=dims.num_kv_heads,
            head_dim=dims.head_dim,
            layers=dims.num_layers,
            vocab=hf["vocab_size"],
            tp=tp,
        )

    def layer_gemms(self) -> list[tuple[int, int]]:
        """(n, k) of qkv, o, gate_up and down."""
        q_width = self.heads * self.head_dim
        return [
            ((self.heads + 2 * self.kv_heads) * self.head_dim, self.hidden),
            (self.hidden, q_width),
            (2 * self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]

    @property
    def lm_head(self) -> tuple[int, int]:
        """(n, k) of the vocab-parallel lm_head."""
        return math.ceil(self.vocab / self.tp), self.hidden

    @property
    def attention_key(self) -> tuple[int, int, int]:
        return self.heads, self.kv_heads, self.head_dim


def _bracket(grid: np.ndarray, x: float) -> tuple[int, int, float, float]:
    """Neighbours i0, i1 of x in ``grid``, the weight of i1, and a scale past the end."""
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0, x / float(grid[-1])
    if x <= grid[0]:
        return 0, 0, 0.0, 1.0
    i1 = int(np.searchsorted(grid, x))
    i0 = i1 - 1
    return i0, i1, (x - grid[i0]) / (grid[i1] - grid[i0]), 1.0


@dataclass(frozen=True)
class GemmTable:
    """bf16 GEMM seconds on the (m, n, k) grid; NaN where the table has no row."""

    ms: np.ndarray
    ns: np.ndarray
    ks: np.ndarray
    seconds_grid: np.ndarray

    def seconds(self, m: int, n: int, k: int) -> float:
        """Trilinear in (m, n, k); proportional past the largest m, n or k."""
        brackets = [_bracket(g, x) for g, x in ((self.ms, m), (self.ns, n), (self.ks, k))]
        total = 0.0
        for corner in range(8):
            weight, index = 1.0, []
            for axis, (i0, i1, w, _) in enumerate(brackets):
                upper = corner >> axis & 1
                weight *= w if upper else 1.0 - w
                index.append(i1 if upper else i0)
            if weight > 0:
                value = float(self.seconds_grid[tuple(index)])
                if math.isnan(value):
                    raise ValueError(f"GEMM table has no row near m={m}, n={n}, k={k}")
                total += weight * value
        return total * math.prod(b[3] for b in brackets)


@dataclass(frozen=True)
class KernelTables:
    """The published H100 SXM tables, in seconds, for bf16 weights, activations and KV.

    ``context_attention[(heads, kv_heads, head_dim)]`` maps a context length to the
    batch-1 prefill attention time; ``generation_attention[...]`` maps (batch, context)
    to one decode step's attention; ``allreduce[(gpus, backend)]`` maps bytes to time.
    """

    gemm: GemmTable
    context_attention: dict[tuple[int, int, int], dict[int, float]]
    generation_attention: dict[tuple[int, int, int], dict[tuple[int, int], float]]
    allreduce: dict[tuple[int, str], dict[int, float]]
    pcie_bytes_per_s: float | None


def _read_parquet(wheel: zipfile.ZipFile, member: str) -> dict[str, list]:
    import pyarrow.parquet as pq  # derivation-only dependency

    return pq.read_table(io.BytesIO(wheel.read(member))).to_pydict()


def _rows(table: dict[str, list]) -> list[dict[str, object]]:
    columns = list(table)
    return [dict(zip(columns, values, strict=True)) for values in zip(*table.values(), strict=True)]


def _gemm_table(table: dict[str, list]) -> GemmTable:
    rows = [r for r in _rows(table) if r["gemm_dtype"] == "bfloat16"]
    axes = [np.array(sorted({r[key] for r in rows}), dtype=float) for key in "mnk"]
    grid = np.full([len(a) for a in axes], np.nan)
    where = [{float(v): i for i, v in enumerate(a)} for a in axes]
    for r in rows:
        grid[tuple(where[i][float(r[key])] for i, key in enumerate("mnk"))] = r["latency"] * _MS
    return GemmTable(*axes, grid)


def _is_plain_attention(row: dict[str, object]) -> bool:
    return (
        row["kernel_source"] == ATTENTION_KERNEL
        and row["kv_cache_dtype"] == "bfloat16"
        and row["window_size"] == 0
    )


def _attention_key(row: dict[str, object]) -> tuple[int, int, int]:
    return row["num_heads"], row["num_key_value_heads"], row["head_dim"]


def _context_table(table: dict[str, list]) -> dict[tuple[int, int, int], dict[int, float]]:
    out: dict[tuple[int, int, int], dict[int, float]] = {}
    for r in _rows(table):
        if _is_plain_attention(r) and r["batch_size"] == 1:
            out.setdefault(_attention_key(r), {})[r["isl"]] = r["latency"] * _MS
    return out


def _generation_table(
    table: dict[str, list],
) -> dict[tuple[int, int, int], dict[tuple[int, int], float]]:
    """Keyed by (batch, context): the step attends to ``step`` cached tokens plus its own."""
    out: dict[tuple[int, int, int], dict[tuple[int, int], float]] = {}
    for r in _rows(table):
        if _is_plain_attention(r):
            key = (r["batch_size"], r["step"] + 1)
            out.setdefault(_attention_key(r), {})[key] = r["latency"] * _MS
    return out


def _allreduce_table(table: dict[str, list]) -> dict[tuple[int, str], dict[int, float]]:
    out: dict[tuple[int, str], dict[int, float]] = {}
    for r in _rows(table):
        if r["allreduce_dtype"] == "bfloat16":
            out.setdefault((r["num_gpus"], r["backend"]), {})[r["message_size"]] = (
                r["latency"] * _MS
            )
    return out


def _pcie_bytes_per_s(wheel: zipfile.ZipFile) -> float | None:
    import yaml  # derivation-only dependency

    node = yaml.safe_load(wheel.read(SYSTEM_YAML)).get("node", {})
    value = node.get("pcie_bw")
    return float(value) if value else None


def read_tables(wheel_path: str | Path) -> KernelTables:
    """Read the H100 SXM vLLM tables and system figures out of the wheel."""
    with zipfile.ZipFile(wheel_path) as wheel:
        return KernelTables(
            gemm=_gemm_table(_read_parquet(wheel, GEMM_TABLE)),
            context_attention=_context_table(_read_parquet(wheel, CONTEXT_TABLE)),
            generation_attention=_generation_table(_read_parquet(wheel, GENERATION_TABLE)),
            allreduce=_allreduce_table(_read_parquet(wheel, ALLREDUCE_TABLE)),
            pcie_bytes_per_s=_pcie_bytes_per_s(wheel),
        )


def _context_attention_s(curve: dict[int, float], n: int) -> float:
    """Log-log interpolation in the context length; n^2 growth past the last point."""
    lengths = sorted(curve)
    if n >= lengths[-1]:
        return curve[lengths[-1]] * (n / lengths[-1]) ** 2
    log_t = np.interp(math.log(n), np.log(lengths), np.log([curve[x] for x in lengths]))
    return math.exp(float(log_t))


def _allreduce_s(curve: dict[int, float], nbytes: int) -> float:
    """Linear in bytes between measured sizes, proportional past the largest."""
    sizes = sorted(curve)
    if nbytes >= sizes[-1]:
        return curve[sizes[-1]] * nbytes / sizes[-1]
    return float(np.interp(nbytes, sizes, [curve[s] for s in sizes]))


def _lookup(tables: dict, key: tuple[int, int, int], what: str) -> dict:
    if key not in tables:
        raise ValueError(f"no {what} measurement for heads, kv_heads, head_dim = {key}")
    return tables[key]


def _layer_linear_s(tables: KernelTables, share: LlamaShare, m: int, backend: str) -> float:
    """The four GEMMs of a layer at ``m`` tokens plus, under TP, its two all-reduces."""
    gemms = sum(tables.gemm.seconds(m, n, k) for n, k in share.layer_gemms())
    if share.tp == 1:
        return gemms
    curve = tables.allreduce.get((share.tp, backend))
    if curve is None:
        raise ValueError(f"no all-reduce measurement for {share.tp} GPUs ({backend})")
    return gemms + 2 * _allreduce_s(curve, m * share.hidden * _BF16_BYTES)


def prefill_s(tables: KernelTables, share: LlamaShare, n: int) -> float:
    """Kernel time of an unchunked prefill of ``n`` tokens; logits for the last one."""
    curve = _lookup(tables.context_attention, share.attention_key, "context attention")
    per_layer = _layer_linear_s(tables, share, n, "vllm_eager") + _context_attention_s(curve, n)
    return share.layers * per_layer + tables.gemm.seconds(1, *share.lm_head)


def decode_points(tables: KernelTables, share: LlamaShare) -> list[tuple[int, int, float]]:
    """(batch, context, seconds) of a decode step wherever decode attention was measured."""
    attention = _lookup(tables.generation_attention, share.attention_key, "generation attention")
    points = []
    for batch in DECODE_BATCHES:
        linear = share.layers * _layer_linear_s(tables, share, batch, "vllm_graph")
        head = tables.gemm.seconds(batch, *share.lm_head)
        for context in DECODE_CONTEXTS:
            if (batch, context) in attention:
                seconds = linear + head + share.layers * attention[batch, context]
                points.append((batch, context, seconds))
    return points


def fit_decode(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Non-negative (d0, d1, d2) of t = d0 + d1 b + d2 b c, least squares in relative error.

    Relative error, so that the 10 ms steps weigh as much as the second-long ones.
    """
    design = np.array([[1.0, b, b * c] for b, c, _ in points])
    times = np.array([t for _, _, t in points])
    d0, d1, d2 = nonnegative_lstsq(design / times[:, None], [1.0] * len(points))
    return d0, d1, d2


def regenerate_command() -> str:
    return (
        f"pip download --no-deps aiconfigurator-core=={AIC_VERSION} -d /tmp/aic && "
        "python experiments/derive_h100_profiles.py "
        f"--wheel /tmp/aic/aiconfigurator_core-{AIC_VERSION}-cp311-abi3-manylinux_2_28_x86_64.whl "
        "--out-dir continuum_tiered/data/profiles (the tiers alone, keeping the kernel fits, "
        "without the wheel: --tiers-only instead of --wheel)"
    )


def _cpu_tier(pcie_bytes_per_s: float | None) -> tuple[Tier, str]:
    if pcie_bytes_per_s is None:
        bandwidth = 25e9
        text = f"cpu = PCIe Gen5 host<->device, {bandwidth:.3g} B/s per direction assumed (the "
        text += "package's system file gives no PCIe bandwidth)"
    else:
        bandwidth = pcie_bytes_per_s
        text = (
            f"cpu = PCIe Gen5 host<->device at the package's {SYSTEM_YAML} node.pcie_bw "
            f"({bandwidth:.3g} B/s per direction, a nominal link figure: published), for loads "
            "and stores alike"
        )
    duplex = PCIE_DUPLEX_SHARE * bandwidth
    text += (
        f", {duplex:.3g} B/s per direction while both run ({PCIE_DUPLEX_SHARE:g} of it, "
        f"assumed), latency {CPU_TIER_LATENCY_S:.0e} s assumed"
    )
    return Tier("cpu", bandwidth, CPU_TIER_LATENCY_S, bandwidth, duplex), text


def _source(share: LlamaShare, cpu_text: str, pcie_published: bool) -> str:
    tables = ", ".join((GEMM_TABLE, CONTEXT_TABLE, GENERATION_TABLE))
    if share.tp > 1:
        tables += f", {ALLREDUCE_TABLE} ({share.tp} GPUs)"
    disk = DISK_TIER
    return (
        f"Derived from aiconfigurator-core {AIC_VERSION} measured H100 SXM vLLM {VLLM_VERSION} "
        f"kernel tables ({tables}); not measured by `continuum-tiered profile`. Kernel time "
        f"only (bf16 GEMMs, FA3 attention{', custom all-reduce' if share.tp > 1 else ''}; no "
        "norms, rotary, activation, sampling or CPU overhead), composed per layer as in "
        f"continuum_tiered/profiling/published.py for tensor parallel {share.tp}. Prefill fitted "
        f"over n = {PREFILL_LENGTHS[0]}..{PREFILL_LENGTHS[-1]} unchunked; decode over batch "
        f"{DECODE_BATCHES[0]}..{DECODE_BATCHES[-1]} x context {DECODE_CONTEXTS[0]}.."
        f"{DECODE_CONTEXTS[-1]} where measured. Tiers: {cpu_text}; disk = one local NVMe, "
        f"read {disk.bandwidth_bytes_per_s:.2g} B/s, write {disk.write_bandwidth:.2g} B/s, "
        f"read under a concurrent write {disk.duplex_bandwidth:.2g} B/s, latency "
        f"{disk.latency_s:.0e} s (all assumed). Host memcpy: {HOST_MEMCPY_BYTES_PER_S:.2g} B/s "
        "for one thread (assumed). Provenance: the prefill and decode fits are derived from "
        "the published kernel tables, "
        + ("the PCIe figure is published, " if pcie_published else "")
        + f"every other figure is assumed. Regenerate with: {regenerate_command()}. "
        "Re-measure these figures "
        "with `continuum-tiered profile` when a GPU is lent."
    )


def derive_profile(tables: KernelTables, model: str, tp: int) -> TierProfile:
    """The H100 profile of ``model`` (a name of the deployment's MODEL_SHAPES).

    ``tp`` is the tensor-parallel degree the shape's config is one GPU's share of.
    """
    share = LlamaShare.from_hf_config(Deployment(model=model).hf_config(), tp)
    prefill = [prefill_s(tables, share, n) for n in PREFILL_LENGTHS]
    return h100_profile(
        model,
        tp,
        fit_quadratic(PREFILL_LENGTHS, prefill),
        fit_decode(decode_points(tables, share)),
        tables.pcie_bytes_per_s,
    )


def h100_profile(
    model: str,
    tp: int,
    prefill_coeffs: tuple[float, float, float],
    decode_coeffs: tuple[float, float, float],
    pcie_bytes_per_s: float | None,
) -> TierProfile:
    """The profile of ``model`` from its kernel fits and the package's PCIe figure (None:
    the package gives none): everything else is assumed, and needs no wheel."""
    hf = Deployment(model=model).hf_config()
    cpu_tier, cpu_text = _cpu_tier(pcie_bytes_per_s)
    profile = TierProfile(
        version=PROFILE_VERSION,
        model=ModelShape.from_hf_config(hf, name=model),
        device="cuda",
        tiers={"cpu": cpu_tier, "disk": DISK_TIER},
        prefill_coeffs=prefill_coeffs,
        source=_source(LlamaShare.from_hf_config(hf, tp), cpu_text, pcie_bytes_per_s is not None),
        decode_coeffs=decode_coeffs,
        host_memcpy_bytes_per_s=HOST_MEMCPY_BYTES_PER_S,
    )
    provenance = dict.fromkeys(profile.figure_paths(), "assumed")
    provenance |= {"prefill_coeffs": "derived", "decode_coeffs": "derived"}
    if pcie_bytes_per_s is not None:
        for direction in ("bandwidth_bytes_per_s", "write_bandwidth_bytes_per_s"):
            provenance[f"tiers.cpu.{direction}"] = "published"
    return replace(profile, provenance=provenance)
