"""InferCept (ICML'24): at each interception, preserve, swap or discard the KV, whichever
wastes the least GPU memory-time.

For a context of C tokens and an expected interception of T seconds (the mean observed
duration of the tool, else of all tools, else ``default_duration_s``):

- preserve: the KV sits idle in GPU memory for the call: C x T;
- discard: it is recomputed on return, holding its memory for the prefill: C x prefill(C);
- swap: it is copied to host memory and back, holding its memory for both copies:
  C x 2 x reload(C) through the profile's CPU tier.

Preserve pins for ``preserve_ttl_s`` (until the program returns, in practice; pins are
still released under memory pressure), swap releases the GPU copy after offloading it.
Swap is a choice only where the connector has a tier to copy to (``TurnEnd.can_offload``):
a server without LMCache tiers chooses between preserve and discard.
"""

from __future__ import annotations

import math

from continuum_tiered.core.profile import TierProfile
from continuum_tiered.core.ttl import SlidingMean, TTLDecision
from continuum_tiered.policies.base import RetentionPolicy, TurnEnd


class InferCeptPolicy(RetentionPolicy):
    name = "infercept"

    def __init__(
        self,
        profile: TierProfile,
        preserve_ttl_s: float = 3600.0,
        default_duration_s: float = 1.0,
        window: int = 256,
        max_tools: int = 256,
    ) -> None:
        self.profile = profile
        self.preserve_ttl_s = preserve_ttl_s
        self.default_duration_s = default_duration_s
        self._window = window
        self._max_tools = max_tools  # tool names come from clients: bound what they cost
        self._by_tool: dict[str, SlidingMean] = {}
        self._all = SlidingMean(window)

    def expected_duration_s(self, tool: str | None) -> float:
        for mean in (self._by_tool.get(tool or ""), self._all):
            if mean is not None and mean.count:
                return mean.value
        return self.default_duration_s

    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision:
        c = turn.context_tokens
        waste = {
            "preserve": c * self.expected_duration_s(turn.tool),
            "discard": c * self.profile.prefill_time(c),
            "swap": c * 2 * self.profile.reload_time("cpu", c)
            if turn.can_offload and "cpu" in self.profile.tiers
            else math.inf,
        }
        choice = min(waste, key=waste.__getitem__)
        ttl = self.preserve_ttl_s if choice == "preserve" else 0.0
        return TTLDecision(ttl, waste[choice], choice, offload=choice == "swap")

    def observe_tool_duration(self, tool: str | None, duration_s: float) -> None:
        self._all.add(duration_s)
        mean = self._by_tool.get(tool) if tool is not None else None
        if mean is None and tool is not None and len(self._by_tool) < self._max_tools:
            mean = self._by_tool[tool] = SlidingMean(self._window)
        if mean is not None:
            mean.add(duration_s)
