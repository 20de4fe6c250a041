"""Continuum's cost-model TTL (docs/architecture.md, 'Continuum TTL'), tiers in ReloadOrPrefill."""

from __future__ import annotations

from continuum_tiered.core.profile import TierProfile
from continuum_tiered.core.tool_durations import ToolDurationModel
from continuum_tiered.core.ttl import (
    EtaEstimator,
    SlidingMean,
    TTLDecision,
    cold_start_ttl,
    fast_best_ttl,
)
from continuum_tiered.policies.base import RetentionPolicy, TurnEnd


class ContinuumPolicy(RetentionPolicy):
    """tau* = argmax P(tau, tool) * (T_q * eta + ReloadOrPrefill) - tau.

    Until a tool has ``min_samples`` durations the TTL is the optimum for Exp(1 s) tool
    times, or ``cold_start_ttl_s`` when given (the public Continuum plugin's fixed 2 s).
    """

    name = "continuum"

    def __init__(
        self,
        profile: TierProfile,
        min_samples: int = 100,
        duration_window: int = 1024,
        max_tools: int = 256,
        queue_window: int = 64,
        eta_min_programs: int = 10,
        eta_window: int = 1000,
        cold_start_ttl_s: float | None = None,
    ) -> None:
        if cold_start_ttl_s is not None and not cold_start_ttl_s >= 0:
            raise ValueError(f"cold_start_ttl_s must be >= 0, got {cold_start_ttl_s}")
        self.profile = profile
        self.cold_start_ttl_s = cold_start_ttl_s
        self.tool_durations = ToolDurationModel(min_samples, duration_window, max_tools)
        self.queue_delay = SlidingMean(queue_window)
        self.eta = EtaEstimator(eta_min_programs, eta_window)

    def benefit_s(self, turn: TurnEnd) -> float:
        """What keeping the KV saves if the program comes back while it is pinned."""
        return self.queue_delay.value * self.eta.value + self.profile.reload_or_prefill(
            turn.context_tokens, turn.tier
        )

    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
        benefit = self.benefit_s(turn)
        selected = self.tool_durations.select(turn.tool)
        if selected is None:
            ttl = (
                cold_start_ttl(benefit) if self.cold_start_ttl_s is None else self.cold_start_ttl_s
            )
            return TTLDecision(ttl, benefit, "cold-start")
        cdf, scope = selected
        return TTLDecision(fast_best_ttl(cdf, benefit), benefit, scope)

    def observe_tool_duration(self, tool: str | None, duration_s: float) -> None:
        self.tool_durations.observe(tool, duration_s)

    def observe_queue_delay(self, delay_s: float) -> None:
        self.queue_delay.add(delay_s)

    def observe_program_finished(self, total_turns: int) -> None:
        self.eta.program_finished(total_turns)
