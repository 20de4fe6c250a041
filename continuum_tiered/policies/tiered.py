"""Our retention policy: Continuum's TTL priced at the tier that will hold the KV, and
pins given up under pressure by expected saving per block.

What it changes over ``continuum`` and why:

- **Which pin goes first under pressure.** Continuum releases the most recently arrived
  program's pin. We release the pin that is expected to save the least per block it
  holds: P(the program returns before the deadline | it has been away this long) x the
  pin's benefit / its blocks. A small pin whose tool is about to return outranks a
  large pin whose tool has outlived most of its distribution, whatever their arrival.
- **Tier pricing** (``TurnEnd.tier``): KV that LMCache will hold in CPU memory costs a
  copy to bring back, not a prefill, so its pin's benefit (and TTL) is small.

One TTL fixed when the turn ends is already the best stopping time while the tool's
distribution and the benefit stay put: a program's absence carries no information but
"not back yet", which the argmax over deadlines already conditions on. Re-deciding as
time passes only pays when the benefit itself moves, which pressure releases cover.
"""

from __future__ import annotations

import math

from continuum_tiered.core.pins import Pin
from continuum_tiered.policies.continuum import ContinuumPolicy


class TieredPolicy(ContinuumPolicy):
    name = "tiered"

    def return_probability(self, pin: Pin, now_s: float) -> float:
        """P(the program comes back by the pin's deadline | not back after ``now_s``).

        A pin past its deadline is only kept while its program waits: certainty. Without
        enough samples for the tool, the cold-start model's Exp(1 s) is memoryless.
        """
        if now_s >= pin.deadline_s:
            return 1.0
        elapsed = now_s - pin.pinned_at_s
        remaining = pin.deadline_s - now_s
        selected = self.tool_durations.select(pin.tool)
        if selected is None:
            return -math.expm1(-remaining)
        cdf = selected[0]
        gone = cdf.prob_le(elapsed)
        if gone >= 1.0:  # away longer than every sample: nothing says it is coming back
            return 0.0
        return (cdf.prob_le(pin.deadline_s - pin.pinned_at_s) - gone) / (1.0 - gone)

    def pressure_key(self, pin: Pin, now_s: float) -> tuple[float, ...]:
        saving = self.return_probability(pin, now_s) * pin.benefit_s
        return (saving / max(1, pin.num_blocks), -pin.program_seq)
