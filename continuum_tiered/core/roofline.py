"""A tier profile estimated from a model's shape when no measured profile is at hand.

Prefill time is compute-bound: 2 FLOPs per parameter per token, plus causal attention
(QK^T and PV, each 2 * n^2/2 * heads * head_dim FLOPs per layer), at an effective
throughput per device. Tier reloads move ``kv_bytes_per_token * n`` at a typical
bandwidth. These are estimates to get sensible TTLs out of the box; the profiling CLI
replaces them with measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from continuum_tiered.core.model_shapes import ModelDims, attention_dims, model_dims
from continuum_tiered.core.profile import PROFILE_VERSION, ModelShape, Tier, TierProfile


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
    """Parameters of a decoder from its config (embeddings included, every expert of a
    mixture of experts), under any family's field names
    (:mod:`continuum_tiered.core.model_shapes`)."""
    return _parameters(model_dims(hf_config), active_only=False)


def active_parameter_count(hf_config: dict) -> int:
    """Parameters one token's forward pass multiplies by: a mixture of experts counts only
    the experts a token is routed to (a dense model: :func:`parameter_count`)."""
    return _parameters(model_dims(hf_config), active_only=True)


def _parameters(dims: ModelDims, active_only: bool) -> int:
    att = dims.attention
    hidden = att.hidden_size
    # Q and O over all heads, K and V over the KV heads.
    attention = hidden * att.head_dim * (2 * att.num_heads + 2 * att.num_kv_heads)
    mlp_matrices = 3 if dims.gated_mlp else 2
    if dims.num_experts:
        experts = dims.experts_per_token if active_only else dims.num_experts
        mlp = mlp_matrices * hidden * dims.intermediate_size * experts
        mlp += mlp_matrices * hidden * dims.shared_expert_intermediate_size
        mlp += hidden * dims.num_experts  # the router
    else:
        mlp = mlp_matrices * hidden * dims.intermediate_size
    embeddings = dims.vocab_size * hidden * (1 if dims.tie_word_embeddings else 2)
    return att.num_layers * (attention + mlp) + embeddings


def estimated_profile(hf_config: dict, shape: ModelShape, device: str) -> TierProfile:
    """A profile from the roofline of ``device``. Any config works: a field the model's
    family does not name as Llama does is read under its own name, or assumed with a
    warning (:mod:`continuum_tiered.core.model_shapes`)."""
    roof = ROOFLINES[device]
    heads = attention_dims(hf_config, shape.name).num_heads
    linear = 2 * active_parameter_count(hf_config) / roof.effective_flops
    quadratic = 2 * shape.num_layers * heads * shape.head_dim / roof.effective_flops
    return TierProfile(
        version=PROFILE_VERSION,
        model=shape,
        device=device,
        tiers={"cpu": roof.cpu_tier, "disk": roof.disk_tier},
        prefill_coeffs=(roof.step_overhead_s, linear, quadratic),
        source=f"roofline estimate (continuum_tiered.core.roofline, {device}); not measured",
    )
