"""A program's state in the virtual-time replay, and the per-policy hooks that read it.

Kept apart from the engine so that policy definitions import without vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from continuum_tiered.core.metrics import ProgramOutcome
from continuum_tiered.traces.model import TraceProgram


@dataclass
class ProgramRun:
    """One program's progress through the replay and what it experienced."""

    program: TraceProgram
    seq: int
    context: list[int] = field(default_factory=list)
    block_hashes: list = field(default_factory=list)  # of the last finished turn
    turn: int = 0
    attained_s: float = 0.0  # GPU time of steps it was part of (Autellix's service)
    start_s: float | None = None  # when its first turn reached a replica
    end_s: float | None = None
    queue_s: float = 0.0
    prompt_tokens: int = 0
    hit_tokens: int = 0
    holds_pin: bool = False  # when its latest turn arrived

    @property
    def jct_s(self) -> float:
        return self.outcome().jct_s

    def outcome(self) -> ProgramOutcome:
        assert self.start_s is not None and self.end_s is not None
        turns = len(self.program.turns)
        return ProgramOutcome(
            self.start_s, self.end_s, turns, self.queue_s, self.prompt_tokens, self.hit_tokens
        )


@dataclass(frozen=True)
class ReplayHooks:
    """What a policy changes in the replay besides the connector configuration."""

    priority: Callable[[ProgramRun], int] = lambda run: 0
    send_hints: bool = False
