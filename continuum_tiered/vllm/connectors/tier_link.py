"""What ``ContinuumConnector`` learns from outside itself: the time, and the tiers below the GPU.

A pin's TTL weighs the cost of losing the GPU copy, which depends on where the KV is found
afterwards (a lower tier, or nowhere: recompute), and deadlines need a clock. The connector
asks both of one :class:`TierLink`, handed to it once with ``bind_tiers``:

- :class:`NoTiers` (the default): wall-clock time, no lower tier;
- ``ContinuumTieredConnector``: LMCache's tiers as its worker half reports them;
- the virtual-time replay: its clock, and its model of LMCache's tiers when it has one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from vllm.v1.request import Request


class TierLink(Protocol):
    # Whether ``offload`` copies a finished turn's KV to a lower tier; policies that would
    # ask for a copy are told when it cannot.
    can_offload: bool

    def now(self) -> float:
        """Seconds, on the clock request arrival times and pin deadlines are on."""
        ...

    def tier_after_release(self, request: Request) -> str | None:
        """The tier a finished turn's KV will be found in once its GPU copy goes (a tier
        name of the profile), or None: recompute."""
        ...

    def offload(self, request: Request) -> None:
        """Copy a finished turn's KV to a lower tier (only called if ``can_offload``)."""
        ...


class NoTiers:
    """No tier below the GPU; time from ``clock`` (the wall clock unless given)."""

    can_offload = False

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def now(self) -> float:
        return self.clock()

    def tier_after_release(self, request: Request) -> str | None:
        return None

    def offload(self, request: Request) -> None:
        raise RuntimeError("no tier below the GPU to offload to")
