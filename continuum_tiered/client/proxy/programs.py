"""Which program a request belongs to, and each program's first arrival and turn counter.

Identity, first match wins:

1. the program header (``X-Program-Id`` unless ``--program-header`` names another);
2. the body's ``user`` field (the OpenAI API's end-user id, which agent frameworks often
   set to a run or conversation id);
3. the ``session_id`` or ``X-Session-Id`` header.

Empty values do not count. A request with none of them is a one-turn program of its own.
Ids longer than the hints allow, or with lone surrogates (which no hint takes), are replaced
by their SHA-256, so they stay distinct.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from continuum_tiered.core.hints import MAX_PROGRAM_ID_LEN

DEFAULT_PROGRAM_HEADER = "X-Program-Id"
SESSION_HEADERS = ("session_id", "X-Session-Id")


def program_identity(
    headers: Mapping[str, str], body: Mapping[str, object], program_header: str
) -> str | None:
    """The program id of a request; ``headers`` must be case-insensitive (HTTP headers are)."""
    candidates = (
        headers.get(program_header),
        body.get("user"),
        *(headers.get(name) for name in SESSION_HEADERS),
    )
    identity = next((c for c in candidates if isinstance(c, str) and c), None)
    if identity is None:
        return None
    try:
        encoded = identity.encode()
    except UnicodeEncodeError:  # lone surrogates (a JSON "\ud800"): no valid hint takes them
        return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
    if len(identity) > MAX_PROGRAM_ID_LEN:
        return hashlib.sha256(encoded).hexdigest()
    return identity


@dataclass
class ProxyProgram:
    program_id: str
    first_arrival_s: float
    last_seen_s: float
    next_turn: int = 0


class ProgramRegistry:
    """Programs seen in the last ``idle_timeout_s``, at most ``max_programs`` of them.

    The proxy never learns when an agent is done, so a program is forgotten once it has
    sent nothing for ``idle_timeout_s`` (or, beyond ``max_programs``, the least recently
    seen one is). A forgotten program that comes back starts over: turn 0 and a new first
    arrival. Its KV pin upstream does not depend on this table: the connector drops every
    pin at its TTL deadline, or sooner under memory pressure.
    """

    def __init__(self, idle_timeout_s: float, max_programs: int = 100_000) -> None:
        if idle_timeout_s <= 0:
            raise ValueError(f"idle timeout must be > 0 s, got {idle_timeout_s}")
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        self.idle_timeout_s = idle_timeout_s
        self.max_programs = max_programs
        self._programs: OrderedDict[str, ProxyProgram] = OrderedDict()  # least recent first

    def __len__(self) -> int:
        return len(self._programs)

    def next_turn(
        self, program_id: str, now_s: float, last_turn: bool = False
    ) -> tuple[float, int]:
        """Record a request of the program; returns (its first arrival in s, this turn).

        After a last turn the program is forgotten: its id may start a new program.
        """
        self._forget_idle(now_s)
        program = self._programs.pop(program_id, None)
        if program is None:
            program = ProxyProgram(program_id, first_arrival_s=now_s, last_seen_s=now_s)
            if len(self._programs) >= self.max_programs:
                self._programs.popitem(last=False)
        turn = program.next_turn
        program.next_turn += 1
        program.last_seen_s = now_s
        if not last_turn:
            self._programs[program_id] = program
        return program.first_arrival_s, turn

    def _forget_idle(self, now_s: float) -> None:
        while self._programs:
            oldest = next(iter(self._programs.values()))
            if now_s - oldest.last_seen_s < self.idle_timeout_s:
                return
            self._programs.popitem(last=False)
