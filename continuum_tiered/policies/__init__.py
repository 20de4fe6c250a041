"""Retention policies by name, for the connector's configuration."""

from __future__ import annotations

import inspect

from continuum_tiered.core.profile import TierProfile
from continuum_tiered.policies.base import RetentionPolicy, TurnEnd
from continuum_tiered.policies.continuum import ContinuumPolicy
from continuum_tiered.policies.infercept import InferCeptPolicy
from continuum_tiered.policies.static_ttl import NoRetentionPolicy, StaticTTLPolicy
from continuum_tiered.policies.tiered import TieredPolicy

DEFAULT_POLICY = "tiered"
# Below LMCache's tiers the pins paid -1.8% to +0.3% of the gain over vLLM in every setting
# and hardware variant replayed (docs/results/components/): a returning turn's KV comes back
# from the CPU tier nearly as fast, so with tiers and no policy given, nothing is pinned.
DEFAULT_POLICY_WITH_TIERS = "none"


def default_policy(tiers: bool) -> str:
    return DEFAULT_POLICY_WITH_TIERS if tiers else DEFAULT_POLICY


POLICIES: dict[str, type[RetentionPolicy]] = {
    cls.name: cls
    for cls in (TieredPolicy, ContinuumPolicy, StaticTTLPolicy, NoRetentionPolicy, InferCeptPolicy)
}

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_POLICY_WITH_TIERS",
    "POLICIES",
    "ContinuumPolicy",
    "InferCeptPolicy",
    "NoRetentionPolicy",
    "RetentionPolicy",
    "StaticTTLPolicy",
    "TieredPolicy",
    "TurnEnd",
    "default_policy",
    "make_policy",
]


def make_policy(name: str, profile: TierProfile, **options: object) -> RetentionPolicy:
    """Build the policy ``name``; the profile is passed to the policies that take one."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown retention policy {name!r}; valid: {', '.join(sorted(POLICIES))}")
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = {
        p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in named
    } - {"self"}
    takes_profile = "profile" in params
    valid = sorted(params - {"profile"})
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for policy {name!r}; "
            f"valid: {', '.join(valid) or 'none'}"
        )
    return cls(profile, **options) if takes_profile else cls(**options)
