"""The table of live agent programs, keyed by the client's ``program_id``."""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass


class ProgramState(enum.Enum):
    RUNNING = "running"
    IN_TOOL_CALL = "in-tool-call"
    PINNED = "pinned"
    EVICTED = "evicted"
    IDLE = "idle"  # its last request was aborted, errored or ignored
    FINISHED = "finished"


@dataclass
class Program:
    program_id: str
    seq: int  # order of first arrival (0, 1, 2, ...): the program-level FCFS priority
    first_arrival_s: float
    state: ProgramState
    turns_served: int = 0
    last_finish_s: float | None = None
    last_tool: str | None = None
    last_context_tokens: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    live_requests: int = 0  # arrived and not finished, in any state


class ProgramTable:
    """Live programs, bounded so that clients that never send ``last_turn`` cannot grow it.

    Programs with a live request are kept apart from the others, which sit in order of
    last activity. Once ``max_programs`` are known, admitting a new program drops the
    least recently active program without a live request, in O(1). Programs with a live
    request are bounded by the engine's requests, so the table outgrows the bound only
    while they all run. A dropped program that comes back is new to the table and gets
    a new ``seq``.
    """

    def __init__(self, max_programs: int = 100_000) -> None:
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        self.max_programs = max_programs
        self._live: dict[str, Program] = {}
        self._idle: OrderedDict[str, Program] = OrderedDict()  # least recently active first
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._live) + len(self._idle)

    def __iter__(self) -> Iterator[Program]:
        return iter([*self._live.values(), *self._idle.values()])

    def get(self, program_id: str) -> Program | None:
        return self._live.get(program_id) or self._idle.get(program_id)

    def arrive(self, program_id: str, now_s: float) -> Program:
        """A request of the program arrived: create the program on its first arrival."""
        program = self._idle.pop(program_id, None) or self._live.get(program_id)
        if program is None:
            self._make_room()
            program = Program(program_id, self._next_seq, now_s, ProgramState.RUNNING)
            self._next_seq += 1
        program.live_requests += 1
        program.state = ProgramState.RUNNING
        self._live[program_id] = program
        return program

    def record_prompt(self, program_id: str, prompt_tokens: int, prefix_hit_tokens: int) -> None:
        """Add a scheduled turn's prompt length and prefix-cache hit to the program's totals."""
        program = self.get(program_id)
        if program is not None:
            program.prompt_tokens += prompt_tokens
            program.prefix_hit_tokens += prefix_hit_tokens

    def turn_finished(
        self, program_id: str, now_s: float, tool: str | None, context_tokens: int, pinned: bool
    ) -> Program:
        """A turn ended in a tool call; an unknown program (dropped) is created again."""
        program = self.get(program_id) or self.arrive(program_id, now_s)
        program.turns_served += 1
        program.last_finish_s = now_s
        program.last_tool = tool
        program.last_context_tokens = context_tokens
        self._request_ended(program, ProgramState.PINNED if pinned else ProgramState.IN_TOOL_CALL)
        return program

    def request_dropped(self, program_id: str) -> None:
        """A request of the program ended without a turn (aborted, errored, ignored)."""
        program = self.get(program_id)
        if program is not None:
            self._request_ended(program, ProgramState.IDLE)

    def mark_evicted(self, program_id: str) -> None:
        """The program's KV left the GPU while it waits on a tool; no-op otherwise."""
        program = self._idle.get(program_id)
        if program is not None and program.state in (
            ProgramState.PINNED,
            ProgramState.IN_TOOL_CALL,
        ):
            program.state = ProgramState.EVICTED

    def end(self, program_id: str) -> Program | None:
        """Remove a finished program and return it, so the caller can record its stats."""
        program = self._live.pop(program_id, None) or self._idle.pop(program_id, None)
        if program is not None:
            program.state = ProgramState.FINISHED
        return program

    def _request_ended(self, program: Program, state: ProgramState) -> None:
        program.live_requests = max(0, program.live_requests - 1)
        if program.live_requests:
            return  # another request of the program still runs
        program.state = state
        self._live.pop(program.program_id, None)
        self._idle[program.program_id] = program
        self._idle.move_to_end(program.program_id)

    def _make_room(self) -> None:
        if len(self) >= self.max_programs and self._idle:
            self._idle.popitem(last=False)
