"""Where a deployment's tier profile comes from: the one it names, or an estimate.

``continuum-tiered serve`` (before vLLM starts), the connector (when the engine starts)
and the virtual-time replay all resolve a profile here, so each refuses the same profiles:
one measured for another model shape gives wrong TTLs and wrong tier costs.
"""

from __future__ import annotations

from collections.abc import Mapping

from continuum_tiered.core.profile import ModelShape, ProfileRef, TierProfile, load_profile
from continuum_tiered.core.roofline import estimated_profile


def resolve_profile(
    ref: ProfileRef | None,
    hf_config: Mapping[str, object],
    *,
    name: str | None = None,
    dtype_bytes: int = 2,
    device: str | None = None,
) -> TierProfile:
    """The profile ``ref`` names, checked against the model of ``hf_config`` (its shape
    with ``dtype_bytes``) and, unless None, ``device``; without a ``ref``, the roofline
    estimate of that model on ``device``.

    Raises :class:`~continuum_tiered.core.profile.ProfileMismatchError` naming both shapes
    when the profile was measured for another model shape.
    """
    shape = ModelShape.from_hf_config(dict(hf_config), dtype_bytes=dtype_bytes, name=name)
    if ref is not None:
        return load_profile(ref, expect_model=shape, expect_device=device)
    if device is None:
        raise ValueError("estimating a tier profile needs the device it is for")
    return estimated_profile(dict(hf_config), shape, device)
