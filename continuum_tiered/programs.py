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


class ProgramTable:
    """Live programs, bounded so that clients that never send ``last_turn`` cannot grow it.

    Once ``max_programs`` are live, admitting a new program drops the least recently
    active program that is not running (running programs are bounded by the engine, so
    the table only outgrows the bound while all of them run). A dropped program that
    comes back is new to the table and gets a new ``seq``.
    """

    def __init__(self, max_programs: int = 100_000) -> None:
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        self.max_programs = max_programs
        self._programs: OrderedDict[str, Program] = OrderedDict()  # least recently active first
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._programs)

    def __iter__(self) -> Iterator[Program]:
        return iter(list(self._programs.values()))

    def get(self, program_id: str) -> Program | None:
        return self._programs.get(program_id)

    def arrive(self, program_id: str, now_s: float) -> Program:
        """A request of the program arrived: create the program on its first arrival."""
        program = self._touch(program_id, now_s)
        program.state = ProgramState.RUNNING
        return program

    def record_prompt(self, program_id: str, prompt_tokens: int, prefix_hit_tokens: int) -> None:
        """Add a scheduled turn's prompt length and prefix-cache hit to the program's totals."""
        program = self._programs.get(program_id)
        if program is not None:
            program.prompt_tokens += prompt_tokens
            program.prefix_hit_tokens += prefix_hit_tokens

    def turn_finished(
        self, program_id: str, now_s: float, tool: str | None, context_tokens: int, pinned: bool
    ) -> Program:
        """A turn ended in a tool call; an unknown program (dropped) is created again."""
        program = self._touch(program_id, now_s)
        program.turns_served += 1
        program.last_finish_s = now_s
        program.last_tool = tool
        program.last_context_tokens = context_tokens
        program.state = ProgramState.PINNED if pinned else ProgramState.IN_TOOL_CALL
        return program

    def mark_evicted(self, program_id: str) -> None:
        """The program's KV left the GPU while it waits on a tool; no-op otherwise."""
        program = self._programs.get(program_id)
        if program is not None and program.state in (
            ProgramState.PINNED,
            ProgramState.IN_TOOL_CALL,
        ):
            program.state = ProgramState.EVICTED

    def end(self, program_id: str) -> Program | None:
        """Remove a finished program and return it, so the caller can record its stats."""
        program = self._programs.pop(program_id, None)
        if program is not None:
            program.state = ProgramState.FINISHED
        return program

    def _touch(self, program_id: str, now_s: float) -> Program:
        program = self._programs.get(program_id)
        if program is not None:
            self._programs.move_to_end(program_id)
            return program
        self._make_room()
        program = Program(program_id, self._next_seq, now_s, ProgramState.RUNNING)
        self._next_seq += 1
        self._programs[program_id] = program
        return program

    def _make_room(self) -> None:
        if len(self._programs) < self.max_programs:
            return
        victim = next(
            (pid for pid, p in self._programs.items() if p.state is not ProgramState.RUNNING),
            None,
        )
        if victim is not None:
            del self._programs[victim]
