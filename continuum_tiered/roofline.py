"""A tier profile estimated from a model's shape when no measured profile is at hand.

Prefill time is compute-bound: 2 FLOPs per parameter per token, plus causal attention
(QK^T and PV, each 2 * n^2/2 * heads * head_dim FLOPs per layer), at an effective
throughput per device. Tier reloads move ``kv_bytes_per_token * n`` at a typical
bandwidth. These are estimates to get sensible TTLs out of the box; the profiling CLI
replaces them with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from continuum_tiered.profile import PROFILE_VERSION, ModelShape, Tier, TierProfile


@dataclass(frozen=True)
class DeviceRoofline:
    effective_flops: float  # sustained FLOP/s of a prefill, not the datasheet peak
    step_overhead_s: float
    cpu_tier: Tier
    disk_tier: Tier


ROOFLINES = {
    # H100 SXM: 989 TFLOP/s dense bf16 at ~40% utilisation; PCIe Gen5 x16 pinned copies
    # ~25 GB/s effective; one NVMe drive ~2 GB/s.
    "cuda": DeviceRoofline(
        effective_flops=400e12,
        step_overhead_s=0.005,
        cpu_tier=Tier("cpu", 25e9, 20e-6),
        disk_tier=Tier("disk", 2e9, 100e-6),
    ),
    # Two x86 cores with AVX-512 bf16: a few hundred GFLOP/s at best; memcpy ~5 GB/s.
    "cpu": DeviceRoofline(
        effective_flops=1e11,
        step_overhead_s=0.01,
        cpu_tier=Tier("cpu", 5e9, 5e-6),
        disk_tier=Tier("disk", 1e9, 100e-6),
    ),
}


def parameter_count(hf_config: dict) -> int:
    """Parameters of a Llama-style decoder from its config (embeddings included)."""
    hidden = hf_config["hidden_size"]
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    kv_heads = hf_config.get("num_key_value_heads") or heads
    inter = hf_config["intermediate_size"]
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    embeddings = (
        hf_config["vocab_size"] * hidden * (1 if hf_config.get("tie_word_embeddings") else 2)
    )
    return hf_config["num_hidden_layers"] * (attention + mlp) + embeddings


def estimated_profile(hf_config: dict, shape: ModelShape, device: str) -> TierProfile:
    roof = ROOFLINES[device]
    heads = hf_config["num_attention_heads"]
    linear = 2 * parameter_count(hf_config) / roof.effective_flops
    quadratic = 2 * shape.num_layers * heads * shape.head_dim / roof.effective_flops
    return TierProfile(
        version=PROFILE_VERSION,
        model=shape,
        device=device,
        tiers={"cpu": roof.cpu_tier, "disk": roof.disk_tier},
        prefill_coeffs=(roof.step_overhead_s, linear, quadratic),
        source=f"roofline estimate (continuum_tiered.roofline, {device}); not measured",
    )
