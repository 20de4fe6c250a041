"""Options of ``ContinuumConnector``, read from ``kv_connector_extra_config``.

Example::

    --kv-transfer-config '{"kv_connector": "ContinuumConnector", "kv_role": "kv_both",
      "kv_connector_extra_config": {"policy": "continuum", "profile": "h100-llama-3.1-8b"}}'

``profile`` is a built-in profile's name, a profile file's path, or a profile's JSON
itself (what the virtual-time replay passes: the profile it already loaded).

Unknown keys and bad values stop the engine at start-up with a message naming them:
a typo in a deployment's config should not silently fall back to defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from continuum_tiered.core.profile import ProfileError, TierProfile
from continuum_tiered.core.profile_source import resolve_profile
from continuum_tiered.policies import DEFAULT_POLICY, POLICIES, make_policy
from continuum_tiered.policies.base import RetentionPolicy

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig

logger = init_logger(__name__)

# "device": the device the profile must have been measured on; defaults to this process's
# platform. The virtual-time replay runs on a CPU but models a GPU, so it sets "cuda".
_KEYS = ("policy", "policy_options", "profile", "device", "pressure_reserve_blocks")


class ConnectorConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ConnectorOptions:
    policy: str = DEFAULT_POLICY
    policy_options: dict[str, Any] = field(default_factory=dict)
    profile: TierProfile | None = None
    pressure_reserve_blocks: int = 1

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> ConnectorOptions:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        unknown = sorted(k for k in extra if k not in _KEYS and not k.startswith("lmcache."))
        if unknown:
            raise ConnectorConfigError(
                f"ContinuumConnector: unknown kv_connector_extra_config keys {unknown}; "
                f"known keys: {list(_KEYS)}"
            )
        policy = extra.get("policy", DEFAULT_POLICY)
        if policy not in POLICIES:
            raise ConnectorConfigError(
                f"ContinuumConnector: unknown policy {policy!r}; choose one of {sorted(POLICIES)}"
            )
        policy_options = extra.get("policy_options", {})
        if not isinstance(policy_options, dict):
            raise ConnectorConfigError("ContinuumConnector: policy_options must be an object")
        sched = vllm_config.scheduler_config
        # Under pressure a running request needs at most one step's worth of new blocks.
        default_reserve = -(-sched.max_num_batched_tokens // vllm_config.cache_config.block_size)
        reserve = extra.get("pressure_reserve_blocks", default_reserve)
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 1:
            raise ConnectorConfigError(
                "ContinuumConnector: pressure_reserve_blocks must be a positive integer, "
                f"got {reserve!r}"
            )
        return cls(
            policy=policy,
            policy_options=policy_options,
            profile=connector_profile(
                extra.get("profile"), vllm_config.model_config, extra.get("device")
            ),
            pressure_reserve_blocks=reserve,
        )

    def make_policy(self) -> RetentionPolicy:
        assert self.profile is not None
        return make_policy(self.policy, self.profile, **self.policy_options)


def _device_type() -> str:
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda"


def connector_profile(ref: object, model_config: ModelConfig, device: object = None) -> TierProfile:
    """The profile ``ref`` names (or holds: its JSON), checked against the served model;
    without one, an estimate.

    A profile measured for another model or device gives wrong TTLs, so a mismatch is an
    error rather than a warning.
    """
    if device is None:
        device = _device_type()
    elif device not in ("cpu", "cuda"):
        raise ConnectorConfigError(
            f"ContinuumConnector: device must be cpu or cuda, not {device!r}"
        )
    if ref is None:
        logger.warning(
            "ContinuumConnector: no tier profile given; using a roofline estimate for %s on "
            "%s. Measure one with `continuum-tiered profile` and pass it as 'profile'.",
            model_config.model,
            device,
        )
    elif not isinstance(ref, str | dict):
        raise ConnectorConfigError(
            f"ContinuumConnector: profile must be a name, a path or a profile, got {ref!r}"
        )
    try:
        return resolve_profile(
            ref,
            model_config.hf_text_config.to_dict(),
            name=str(model_config.model),
            dtype_bytes=model_config.dtype.itemsize,
            device=device,
        )
    except ProfileError as err:
        raise ConnectorConfigError(f"ContinuumConnector: {err}") from err
