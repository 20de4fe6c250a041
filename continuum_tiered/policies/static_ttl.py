"""Fixed-TTL baselines: the 2 s pin of Continuum's public code, and no pin at all."""

from __future__ import annotations

import math

from continuum_tiered.core.ttl import TTLDecision
from continuum_tiered.policies.base import RetentionPolicy, TurnEnd


class StaticTTLPolicy(RetentionPolicy):
    name = "static-ttl"

    def __init__(self, ttl_s: float = 2.0) -> None:
        if not (math.isfinite(ttl_s) and ttl_s >= 0):
            raise ValueError(f"ttl_s must be a finite number >= 0, got {ttl_s!r}")
        self.ttl_s = float(ttl_s)

    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
        return TTLDecision(ttl_s=self.ttl_s, benefit_s=0.0, source="static")


class NoRetentionPolicy(RetentionPolicy):
    """Never pin: with program-level FCFS this is the 'program order only' ablation."""

    name = "none"

    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
        return TTLDecision(ttl_s=0.0, benefit_s=0.0, source="static")
