"""Client side of program-level scheduling: one ``AgentProgram`` per agent run.

Every request of a program carries

- ``priority``: the program's first-arrival time in integer milliseconds. vLLM's priority
  queue orders by (priority, arrival time), so with ``--scheduling-policy priority`` a
  program that started earlier is served first (program-level FCFS). A timestamp needs
  no coordination between clients and stays ordered across processes and restarts;
- ``kv_transfer_params``: the hints the connector reads (program id, turn, last turn,
  and the tool when the agent knows it in advance).

Use ``extra_body(...)`` with any ``openai`` client call, or the ``complete`` / ``chat``
helpers, which also advance the turn counter.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from continuum_tiered.core.hints import ProgramHints


def program_priority(first_arrival_s: float) -> int:
    return int(first_arrival_s * 1000)


@dataclass
class AgentProgram:
    program_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    first_arrival_s: float = field(default_factory=time.time)
    turn: int = 0

    @property
    def priority(self) -> int:
        return program_priority(self.first_arrival_s)

    def extra_body(self, *, last_turn: bool = False, tool: str | None = None) -> dict[str, Any]:
        """The body fields for this program's current turn."""
        hints = ProgramHints(self.program_id, self.turn, last_turn=last_turn, tool=tool)
        return {"priority": self.priority, "kv_transfer_params": hints.to_params()}

    def _next(self, kwargs: dict[str, Any], last_turn: bool, tool: str | None) -> dict[str, Any]:
        extra = {
            **(kwargs.pop("extra_body", None) or {}),
            **self.extra_body(last_turn=last_turn, tool=tool),
        }
        self.turn += 1
        return {**kwargs, "extra_body": extra}

    def complete(
        self, client: Any, *, last_turn: bool = False, tool: str | None = None, **kwargs: Any
    ) -> Any:
        """``client.completions.create`` for this program's next turn (sync or async client)."""
        return client.completions.create(**self._next(kwargs, last_turn, tool))

    def chat(
        self, client: Any, *, last_turn: bool = False, tool: str | None = None, **kwargs: Any
    ) -> Any:
        """``client.chat.completions.create`` for this program's next turn."""
        return client.chat.completions.create(**self._next(kwargs, last_turn, tool))
