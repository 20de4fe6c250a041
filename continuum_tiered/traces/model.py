"""The trace format: one agent program per JSON line.

    {"program_id": "django__django-11163", "arrival_s": 0.0,
     "turns": [{"prompt_tokens": 1662, "output_tokens": 106, "tool": "ls",
                "tool_duration_s": 0.25}, ...]}

- ``prompt_tokens``: the full prompt of the turn. Each turn's prompt extends the previous
  turn's prompt and output (``prompt_tokens[i+1] >= prompt_tokens[i] + output_tokens[i]``),
  as an agent's growing context does; replays build token ids so prefix caching sees it.
- ``output_tokens`` >= 1: tokens generated (``max_tokens`` with ``ignore_eos``).
- ``tool`` (string or null) and ``tool_duration_s`` >= 0: the tool the turn's reply called
  and how long it ran before the next turn arrived; the last turn's pause is ignored.
- ``arrival_s`` (optional, default 0): the program's first arrival, relative to the start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


class TraceError(ValueError):
    """A malformed trace; the message names the line and field."""


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    output_tokens: int
    tool: str | None
    tool_duration_s: float


@dataclass(frozen=True)
class TraceProgram:
    program_id: str
    turns: tuple[Turn, ...]
    arrival_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "program_id": self.program_id,
            "arrival_s": self.arrival_s,
            "turns": [asdict(t) for t in self.turns],
        }


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise TraceError(f"{where}: {message}")


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return (_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def program_from_json(data: object, where: str = "program") -> TraceProgram:
    _require(isinstance(data, dict), where, "expected a JSON object")
    assert isinstance(data, dict)
    pid = data.get("program_id")
    _require(isinstance(pid, str) and pid != "", f"{where} field program_id", "non-empty string")
    arrival = data.get("arrival_s", 0.0)
    _require(_number(arrival) and arrival >= 0, f"{where} field arrival_s", "number >= 0")
    raw_turns = data.get("turns")
    _require(
        isinstance(raw_turns, list) and len(raw_turns) > 0, f"{where} field turns", "non-empty list"
    )
    turns: list[Turn] = []
    for i, raw in enumerate(raw_turns):
        at = f"{where} field turns[{i}]"
        _require(isinstance(raw, dict), at, "expected a JSON object")
        prompt, output = raw.get("prompt_tokens"), raw.get("output_tokens")
        tool, pause = raw.get("tool"), raw.get("tool_duration_s", 0.0)
        _require(
            _int(prompt) and prompt >= 1, f"{at}.prompt_tokens", f"integer >= 1, got {prompt!r}"
        )
        _require(
            _int(output) and output >= 1, f"{at}.output_tokens", f"integer >= 1, got {output!r}"
        )
        _require(
            tool is None or isinstance(tool, str), f"{at}.tool", f"string or null, got {tool!r}"
        )
        _require(
            _number(pause) and pause >= 0, f"{at}.tool_duration_s", f"number >= 0, got {pause!r}"
        )
        if turns:
            floor = turns[-1].prompt_tokens + turns[-1].output_tokens
            _require(
                prompt >= floor,
                f"{at}.prompt_tokens",
                f"{prompt} does not extend the previous prompt and output ({floor} tokens)",
            )
        turns.append(Turn(prompt, output, tool, float(pause)))
    return TraceProgram(pid, tuple(turns), float(arrival))


def json_lines(path: str | Path) -> Iterator[tuple[str, object]]:
    """Each non-blank line of a JSONL file, parsed, with where it is (``PATH line N``) for
    error messages; a line that is not JSON raises :class:`TraceError` naming it."""
    try:
        with Path(path).open() as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    data = json.loads(line)
                except ValueError as err:
                    raise TraceError(f"{where}: not JSON ({err})") from err
                yield where, data
    except OSError as err:
        raise TraceError(f"{path}: not readable ({err})") from err


def read_trace(path: str | Path) -> list[TraceProgram]:
    """Read a JSONL trace; errors name the file, line and field."""
    programs = [program_from_json(data, where) for where, data in json_lines(path)]
    if not programs:
        raise TraceError(f"{path}: no programs")
    return programs


def write_trace(programs: Iterable[TraceProgram], path: str | Path) -> None:
    with Path(path).open("w") as f:
        for program in programs:
            f.write(json.dumps(program.to_json()) + "\n")
