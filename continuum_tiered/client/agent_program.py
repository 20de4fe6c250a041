"""Client side of program-level scheduling: one ``AgentProgram`` per agent run.

Every request of a program carries

- ``priority``: the program's first-arrival time in integer milliseconds. vLLM's priority
  queue orders by (priority, arrival time), so with ``--scheduling-policy priority`` a
  program that started earlier is served first (program-level FCFS). A timestamp needs
  no coordination between clients and stays ordered across processes and restarts;
- ``kv_transfer_params``: the hints the connector reads (program id, turn, last turn,
  and the tool when the agent knows it in advance);
- the ``X-Session-ID`` header (:data:`ROUTING_HEADER`): the program's routing key. Behind
  several replicas, ``vllm-router --policy consistent_hash`` hashes the first non-empty
  header of ``x-session-id``, ``x-user-id``, ``x-tenant-id``, ... onto its ring, so every
  turn of a program reaches the replica that holds its pin and its LMCache chunks.

Use ``extra_body(...)`` and ``routing_headers()`` with any ``openai`` client call
(``extra_headers=``), or the ``complete`` / ``chat`` helpers, which send both and advance
the turn counter.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.program_tagging import program_priority

# The first header vllm-router's consistent_hash policy reads (before X-User-ID).
ROUTING_HEADER = "X-Session-ID"
_HEADER_SAFE = re.compile(r"[!-~]+")  # visible ASCII: a header value as it is sent


def routing_key(program_id: str) -> str:
    """The program's :data:`ROUTING_HEADER` value: its id when that is a valid header value,
    else the id's SHA-256 (a program id may hold spaces or any Unicode; the router only
    needs the same key on every turn)."""
    if _HEADER_SAFE.fullmatch(program_id):
        return program_id
    return hashlib.sha256(program_id.encode("utf-8", "surrogatepass")).hexdigest()


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

    def routing_headers(self) -> dict[str, str]:
        """The header that keeps this program on one replica behind ``vllm-router``."""
        return {ROUTING_HEADER: routing_key(self.program_id)}

    def _next(self, kwargs: dict[str, Any], last_turn: bool, tool: str | None) -> dict[str, Any]:
        extra = {
            **(kwargs.pop("extra_body", None) or {}),
            **self.extra_body(last_turn=last_turn, tool=tool),
        }
        caller_headers = kwargs.pop("extra_headers", None) or {}
        headers = {
            **{k: v for k, v in caller_headers.items() if k.lower() != ROUTING_HEADER.lower()},
            **self.routing_headers(),
        }
        self.turn += 1
        return {**kwargs, "extra_body": extra, "extra_headers": headers}

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
