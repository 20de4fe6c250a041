"""Derive the built-in H100 tier profiles from aiconfigurator-core's measured kernel tables.

Writes ``h100-llama-3.1-8b.json`` and ``h100-llama-3.1-70b-tp4.json`` and prints them
next to the roofline estimate of ``continuum_tiered.core.roofline`` (prefill) and the HBM
roofline of ``continuum_tiered.sim.step_time`` (decode, used when a profile has none).
Needs ``pyarrow`` and ``pyyaml`` to read the wheel:

    pip download --no-deps aiconfigurator-core==0.12.0 -d /tmp/aic
    python experiments/derive_h100_profiles.py \\
        --wheel /tmp/aic/aiconfigurator_core-0.12.0-cp311-abi3-manylinux_2_28_x86_64.whl \\
        --out-dir continuum_tiered/data/profiles

``--tiers-only`` instead of ``--wheel`` redoes the tiers, host figure, provenance and
source text of the profiles already in ``--out-dir`` without the wheel, keeping their
kernel fits as they are and their PCIe figure (the wheel's node.pcie_bw).

``--roofline`` instead writes the profiles of the models the published composition does not
cover (``ROOFLINE_MODELS``: Gemma 3's sliding-window layers, GLM-4.5's experts; the
composition in ``profiling/published.py`` is a dense Llama layer): the roofline estimate of
``continuum_tiered.core.roofline`` (prefill) and an HBM roofline (decode), with the tiers of
the published ``h100-llama-3.1-8b.json`` in ``--out-dir``, and the estimate's error against
the published-derived Llama profiles stated in the source text. A sliding-window layer's
attention covers at most the window: the quadratic term counts the full-attention layers
only, and each sliding layer adds 4 x heads x head_dim x window FLOPs per token (QK^T and
PV over the window, its upper bound) to the linear one.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.model_shapes import attention_dims, sliding_window_layout
from continuum_tiered.core.profile import ModelShape, TierProfile
from continuum_tiered.core.roofline import ROOFLINES, estimated_profile
from continuum_tiered.profiling.published import derive_profile, h100_profile, read_tables
from continuum_tiered.sim.step_time import (
    H100_HBM_BYTES_PER_S,
    PER_SEQUENCE_DECODE_S,
    StepTimeModel,
)

MODELS = {"llama-3.1-8b": 1, "llama-3.1-70b-tp4": 4}  # model -> tensor-parallel degree
PREFILL_ROWS = (1024, 8192, 32768)
DECODE_ROWS = ((1, 8192), (64, 8192))
# Roofline profiles: model -> (GPU, HBM bytes/s). The H200's compute and PCIe Gen5 link are
# the H100 SXM's; its HBM3e is faster (4.8 TB/s against 3.35).
ROOFLINE_MODELS = {
    "gemma-3-12b": ("one H100 SXM 80 GB", H100_HBM_BYTES_PER_S),
    "glm-4.5-355b-ep8": (
        "one GPU of 8x H200 141 GB (attention tensor-parallel 8, experts expert-parallel 8; "
        "the h100- prefix names the profile set: the H200 has the H100 SXM's compute and "
        "PCIe Gen5 link, and its own HBM in the decode fit)",
        4.8e12,
    ),
}


def _columns(profile: TierProfile, hf: dict) -> list[float]:
    """Prefill seconds at PREFILL_ROWS, then decode step milliseconds at DECODE_ROWS."""
    step = StepTimeModel.from_profile(profile, hf)
    prefill = [profile.prefill_time(n) for n in PREFILL_ROWS]
    decode = [1e3 * step.step_s([], [context] * batch) for batch, context in DECODE_ROWS]
    return prefill + decode


def _table(rows: list[tuple[str, str, list[float]]]) -> str:
    heads = [f"prefill {n // 1024}k s" for n in PREFILL_ROWS]
    heads += [f"decode b{b}x{c // 1024}k ms" for b, c in DECODE_ROWS]
    lines = [f"{'model':<18} {'source':<10} " + " ".join(f"{h:>16}" for h in heads)]
    for model, source, values in rows:
        cells = " ".join(f"{v:>16.4g}" for v in values)
        lines.append(f"{model:<18} {source:<10} {cells}")
    return "\n".join(lines)


def retiered(path: Path, model: str, tp: int) -> TierProfile:
    """The profile at ``path`` with its tiers, host figure, provenance and source redone,
    its kernel fits and PCIe figure kept."""
    old = TierProfile.load(path)
    if old.decode_coeffs is None:
        raise SystemExit(f"{path} has no decode_coeffs: derive it from the wheel")
    cpu = "tiers.cpu.bandwidth_bytes_per_s"
    # A file without provenance predates it and took this figure from node.pcie_bw.
    published = old.provenance.get(cpu, "published") == "published"
    pcie = old.tiers["cpu"].bandwidth_bytes_per_s if published else None
    return h100_profile(model, tp, old.prefill_coeffs, old.decode_coeffs, pcie)


def roofline_profile(model: str, published: TierProfile, hbm_bytes_per_s: float) -> TierProfile:
    """The roofline estimate of ``model`` with ``published``'s tiers and host figure."""
    deployment = Deployment(model=model)
    hf = deployment.hf_config()
    shape = ModelShape.from_hf_config(hf, name=model)
    estimate = estimated_profile(hf, shape, "cuda")
    c0, c1, c2 = estimate.prefill_coeffs
    layout = sliding_window_layout(hf)
    full_kv_per_token = shape.kv_bytes_per_token
    window_kv = 0.0
    if layout is not None:
        heads = attention_dims(hf).num_heads
        flops = ROOFLINES["cuda"].effective_flops
        full = layout.num_layers - layout.sliding_layers
        c2 *= full / layout.num_layers
        c1 += 4 * layout.sliding_layers * heads * shape.head_dim * layout.window / flops
        per_layer = shape.kv_bytes_per_token / layout.num_layers
        full_kv_per_token = per_layer * full
        window_kv = per_layer * layout.sliding_layers * layout.window
    decode = (
        deployment.weight_bytes() / hbm_bytes_per_s,
        PER_SEQUENCE_DECODE_S + window_kv / hbm_bytes_per_s,
        full_kv_per_token / hbm_bytes_per_s,
    )
    provenance = {
        path: kind for path, kind in published.provenance.items() if path.startswith("tiers.")
    }
    provenance |= {
        "host_memcpy_bytes_per_s": published.provenance.get("host_memcpy_bytes_per_s", "assumed"),
        "prefill_coeffs": "assumed",
        "decode_coeffs": "assumed",
    }
    return dataclasses.replace(
        estimate,
        tiers=dict(published.tiers),
        prefill_coeffs=(c0, c1, c2),
        decode_coeffs=decode,
        host_memcpy_bytes_per_s=published.host_memcpy_bytes_per_s,
        provenance=provenance,
    )


def roofline_error(out_dir: Path) -> str:
    """The roofline's error against the published-derived Llama profiles, as text."""
    parts = []
    for model in MODELS:
        published = TierProfile.load(out_dir / f"h100-{model}.json")
        estimate = roofline_profile(model, published, H100_HBM_BYTES_PER_S)
        hf = Deployment(model=model).hf_config()
        est, pub = _columns(estimate, hf), _columns(published, hf)
        errors = [f"{100 * (e / p - 1):+.0f}%" for e, p in zip(est, pub, strict=True)]
        n = len(PREFILL_ROWS)
        prefill = ", ".join(errors[:n])
        decode = ", ".join(errors[n:])
        parts.append(f"{model}: prefill {prefill}; decode {decode}")
    rows = ", ".join(f"{k // 1024}k" for k in PREFILL_ROWS)
    steps = ", ".join(f"batch {b} x {c // 1024}k" for b, c in DECODE_ROWS)
    return (
        f"The same roofline against the published-derived H100 profiles (prefill at n = {rows};"
        f" decode steps at {steps}): " + "; ".join(parts) + ". The published fits count "
        "kernel time only (lower bounds), so part of the prefill gap is theirs; this "
        "profile's prefill is likely too slow by up to about 2x and its decode too fast by "
        "about 20%."
    )


def write_roofline_profiles(out_dir: Path) -> None:
    published = TierProfile.load(out_dir / "h100-llama-3.1-8b.json")
    error = roofline_error(out_dir)
    for model, (gpu, hbm) in ROOFLINE_MODELS.items():
        profile = roofline_profile(model, published, hbm)
        sliding = (
            " Sliding-window layers: the quadratic prefill term counts the full-attention "
            "layers only, each sliding layer adds its window's attention to the linear term, "
            "and a decode step reads their window's KV per sequence, the full layers' KV per "
            "context token."
            if sliding_window_layout(Deployment(model=model).hf_config()) is not None
            else ""
        )
        source = (
            f"Roofline estimate for {gpu}, not measured: prefill from "
            "continuum_tiered.core.roofline (2 FLOPs per active parameter per token plus "
            "causal attention at 400 TFLOP/s effective bf16), decode an HBM roofline "
            f"(every weight read once per step at {hbm:.3g} B/s, plus the KV read and "
            f"{PER_SEQUENCE_DECODE_S:g} s per sequence).{sliding} aiconfigurator-core 0.12.0's "
            "kernel tables are not composed for this model: profiling/published.py composes a "
            f"dense Llama layer only. {error} Tiers and host figure: those of "
            "h100-llama-3.1-8b.json (PCIe Gen5 at the aiconfigurator package's node.pcie_bw, "
            "published; the rest assumed). Regenerate with: python "
            "experiments/derive_h100_profiles.py --roofline --out-dir "
            "continuum_tiered/data/profiles. Re-measure with `continuum-tiered profile` when a "
            "GPU is lent."
        )
        profile = dataclasses.replace(profile, source=source)
        path = out_dir / f"h100-{model}.json"
        profile.save(path)
        print(f"wrote {path}")
    print(error)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path, help="aiconfigurator-core 0.12.0 wheel")
    source.add_argument(
        "--tiers-only",
        action="store_true",
        help="no wheel: redo the tiers of the profiles in --out-dir, keep their kernel fits",
    )
    source.add_argument(
        "--roofline",
        action="store_true",
        help="the roofline profiles of ROOFLINE_MODELS, with the published 8B's tiers",
    )
    p.add_argument("--out-dir", type=Path, default=Path("continuum_tiered/data/profiles"))
    args = p.parse_args()
    if args.roofline:
        write_roofline_profiles(args.out_dir)
        return
    tables = None if args.tiers_only else read_tables(args.wheel)
    rows = []
    for model, tp in MODELS.items():
        path = args.out_dir / f"h100-{model}.json"
        profile = retiered(path, model, tp) if tables is None else derive_profile(tables, model, tp)
        profile.save(path)
        print(f"wrote {path}")
        hf = Deployment(model=model).hf_config()
        roofline = estimated_profile(hf, ModelShape.from_hf_config(hf, name=model), "cuda")
        rows.append((model, "roofline", _columns(roofline, hf)))
        rows.append((model, "published", _columns(profile, hf)))
    print(_table(rows))


if __name__ == "__main__":
    main()
