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
"""

from __future__ import annotations

import argparse
from pathlib import Path

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.profile import ModelShape, TierProfile
from continuum_tiered.core.roofline import estimated_profile
from continuum_tiered.profiling.published import derive_profile, h100_profile, read_tables
from continuum_tiered.sim.step_time import StepTimeModel

MODELS = {"llama-3.1-8b": 1, "llama-3.1-70b-tp4": 4}  # model -> tensor-parallel degree
PREFILL_ROWS = (1024, 8192, 32768)
DECODE_ROWS = ((1, 8192), (64, 8192))


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path, help="aiconfigurator-core 0.12.0 wheel")
    source.add_argument(
        "--tiers-only",
        action="store_true",
        help="no wheel: redo the tiers of the profiles in --out-dir, keep their kernel fits",
    )
    p.add_argument("--out-dir", type=Path, default=Path("continuum_tiered/data/profiles"))
    args = p.parse_args()
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
