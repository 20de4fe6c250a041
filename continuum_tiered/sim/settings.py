"""The settings the experiments replay, and the hardware what-ifs around them.

A setting is one trace on one deployment at three loads: light, where ``vllm`` starts to
saturate, and twice that. The loads come from a sweep of ``vllm`` alone (seed 0, the
setting's programs; see ``experiments/beyond_continuum.py``).

The Gemma 3 12B and GLM-4.5 settings were swept on their first 30 SWE-bench programs
(``vllm`` alone, seed 0, their roofline profiles; loads 0.05, 0.1, 0.2, 0.3, 0.45, 0.6,
stopping at the first whose average JCT reached 1.5x the 0.05 one):

- ``swebench-gemma-12b``: 138 s at 0.05, 164 s at 0.1, 202 s at 0.2, 230 s at 0.3 (1.66x).
- ``swebench-glm-355b``: with 30 programs ``vllm`` does not saturate (251 s at 0.05, 271 s
  at 0.6: their final contexts about fill the 679k-token pool, and a step is short); on 100
  programs (loads 0.1, 0.2, 0.4, 0.8): 277 s at 0.1, 363 s at 0.2, 1,066 s at 0.4 (3.9x).

The new workloads on Llama-3.1-8B were swept on 50 programs (``vllm`` alone, seed 0, loads
0.05, 0.1, 0.15, 0.2, 0.3, 0.45):

- ``openhands-8b``: 88 s at 0.05, 112 s at 0.1, 135 s at 0.15 (1.53x).
- ``claude-code-8b`` and ``codex-8b``: 844 s at 0.05 and 870 s at 0.45 for Claude Code
  (1.03x): the programs spend most of their time in tool calls of seconds to minutes and in
  human waits, so ``vllm`` never queues (0.001 s per turn at 0.45); the middle load is the
  heaviest swept, not a saturation point, and the grid runs 30 programs of each.

A hardware variant changes one thing of the H100 deployment: the CPU tier's size, the
disk's or the PCIe link's bandwidth (every figure of that tier scaled by the same factor,
so write and read-under-write keep their measured ratios to the read figure), or the GPU
(an H200's 141 GB; its step times stay the H100's, so the row isolates memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.core.profile import Tier, load_named_profile


@dataclass(frozen=True)
class Setting:
    name: str
    trace: str
    model: str
    programs: int
    loads: tuple[float, float, float]  # light, vllm starts to saturate, heavier

    @property
    def profile(self) -> str:
        return f"h100-{self.model}"


SETTINGS = {
    s.name: s
    for s in (
        Setting("swebench-8b", "swebench", "llama-3.1-8b", 100, (0.1, 0.15, 0.3)),
        Setting("bfcl-8b", "bfcl", "llama-3.1-8b", 400, (2.0, 3.5, 7.0)),
        Setting("swebench-70b", "swebench", "llama-3.1-70b-tp4", 100, (0.05, 0.1, 0.2)),
        Setting("bfcl-70b", "bfcl", "llama-3.1-70b-tp4", 400, (1.0, 1.5, 3.0)),
        Setting("swebench-gemma-12b", "swebench", "gemma-3-12b", 30, (0.05, 0.3, 0.6)),
        Setting("swebench-glm-355b", "swebench", "glm-4.5-355b-ep8", 100, (0.1, 0.4, 0.8)),
        Setting("openhands-8b", "openhands", "llama-3.1-8b", 50, (0.05, 0.15, 0.3)),
        Setting("claude-code-8b", "claude-code", "llama-3.1-8b", 30, (0.1, 0.45, 0.9)),
        Setting("codex-8b", "codex", "llama-3.1-8b", 30, (0.1, 0.45, 0.9)),
    )
}


@dataclass(frozen=True)
class Hardware:
    name: str
    cpu_tier_bytes: float = 100e9
    gpu_memory_bytes: float | None = None  # None: the model's GPU (an H100's 80 GB, or its own)
    pcie_bytes_per_s: float | None = None  # None: the profile's
    disk_bytes_per_s: float | None = None  # the disk's read figure; None: the profile's

    def deployment(self, setting: Setting) -> Deployment:
        return Deployment(
            model=setting.model,
            gpu_memory_bytes=self.gpu_memory_bytes,
            cpu_tier_bytes=self.cpu_tier_bytes,
        )

    def profile_ref(self, setting: Setting, out_dir: Path) -> str:
        """The setting's profile name, or a file with this variant's tiers."""
        if self.pcie_bytes_per_s is None and self.disk_bytes_per_s is None:
            return setting.profile
        profile = load_named_profile(setting.profile)
        tiers = dict(profile.tiers)
        changed = []
        for name, bandwidth in (("cpu", self.pcie_bytes_per_s), ("disk", self.disk_bytes_per_s)):
            if bandwidth is not None:
                tiers[name] = _scaled(tiers[name], bandwidth)
                changed.append(name)
        variant = dataclasses.replace(
            profile,
            tiers=tiers,
            source=f"{profile.source} What-if `{self.name}`: {', '.join(changed)} scaled.",
            provenance={
                path: "assumed" if _tier_of(path) in changed else kind
                for path, kind in profile.provenance.items()
            },
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{setting.profile}-{self.name}.json"
        variant.save(path)
        return str(path)


def _tier_of(figure_path: str) -> str | None:
    """``tiers.cpu.latency_s`` -> ``cpu``; a figure outside the tiers -> None."""
    parts = figure_path.split(".")
    return parts[1] if parts[0] == "tiers" else None


def _scaled(tier: Tier, bandwidth: float) -> Tier:
    factor = bandwidth / tier.bandwidth_bytes_per_s

    def scale(figure: float | None) -> float | None:
        return None if figure is None else figure * factor

    return dataclasses.replace(
        tier,
        bandwidth_bytes_per_s=bandwidth,
        write_bandwidth_bytes_per_s=scale(tier.write_bandwidth_bytes_per_s),
        duplex_bandwidth_bytes_per_s=scale(tier.duplex_bandwidth_bytes_per_s),
    )


# PCIe x16 per direction: Gen4 16 GT/s, Gen5 32 GT/s (128b/130b coding): 31.5 and 63 GB/s
# nominal; the H100 profile's cpu tier is Gen5 at 64e9. Disks: 2 GB/s (the profile's
# assumption), 7 GB/s (one PCIe Gen4 NVMe's sequential read), 25 GB/s (a stripe of four
# Gen5-class NVMe drives).
HARDWARE = {
    h.name: h
    for h in (
        Hardware("h100-base"),
        Hardware("cpu-tier-1tb", cpu_tier_bytes=1e12),
        Hardware("disk-7gbs", disk_bytes_per_s=7e9),
        Hardware("disk-25gbs", disk_bytes_per_s=25e9),
        Hardware("pcie-gen4", pcie_bytes_per_s=31.5e9),
        Hardware("h200-141gb", gpu_memory_bytes=141e9),
    )
}
