"""The interface the connector asks, at the end of each turn, how long to keep the KV."""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

from continuum_tiered.core.pins import Pin, latest_program_first
from continuum_tiered.core.ttl import TTLDecision

LAST_TURN = TTLDecision(ttl_s=0.0, benefit_s=0.0, source="last-turn")


class TurnEnd(NamedTuple):
    """One finished turn, as the connector tells it (a named tuple: built per turn end on
    the scheduler thread, at half the cost of a frozen dataclass)."""

    program_id: str
    tool: str | None
    context_tokens: int
    last_turn: bool
    now_s: float
    # Fastest tier that will still hold the KV after the pin expires; None: recompute.
    tier: str | None = None
    # Whether the connector can copy the KV to a lower tier now (``TTLDecision.offload``).
    can_offload: bool = False


class RetentionPolicy(abc.ABC):
    """Chooses a pin TTL per finished turn and learns from what the connector observes.

    ``decide`` answers every last turn with a zero TTL itself; subclasses only decide
    turns that end in a tool call, in ``decide_tool_call``.
    """

    name: ClassVar[str]

    def decide(self, turn: TurnEnd) -> TTLDecision:
        return LAST_TURN if turn.last_turn else self.decide_tool_call(turn)

    @abc.abstractmethod
    def decide_tool_call(self, turn: TurnEnd) -> TTLDecision: ...

    def pressure_key(self, pin: Pin, now_s: float) -> tuple[float, ...]:
        """Sort key of pins under memory pressure: the smallest is released first."""
        return latest_program_first(pin)

    def observe_tool_duration(self, tool: str | None, duration_s: float) -> None:  # noqa: B027
        """A program came back ``duration_s`` after its turn ended in ``tool``."""

    def observe_queue_delay(self, delay_s: float) -> None:  # noqa: B027
        """A returning request whose KV was evicted waited ``delay_s`` in the queue."""

    def observe_program_finished(self, total_turns: int) -> None:  # noqa: B027
        """A program ended after ``total_turns`` turns."""
