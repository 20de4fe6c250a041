"""OpenHands runs in the trace format: a parser of OpenHands' raw logs and a loader of the
compact file ``experiments/convert_openhands.py`` writes from them.

Raw format (an OpenHands evaluation run with ``log_completions = true``; see
``continuum_tiered/data/README.md`` for the run the embedded file comes from):

- ``llm_completions/<instance>/*.json``: one file per LLM call, with ``timestamp`` (Unix
  seconds, logged when the response arrived), ``messages`` (the prompt) and ``response``
  (OpenAI style: ``usage.prompt_tokens``, ``usage.completion_tokens``,
  ``usage.prompt_tokens_details.cached_tokens``, ``choices[0].message.tool_calls``).
- ``infer_logs/instance_<instance>.log``: the controller's log. Each ``LEVEL 0 LOCAL STEP``
  line (local time, millisecond resolution) marks the start of an agent step, which the
  controller takes as soon as the previous step's observation (or the user's reply) arrives;
  the step then sends the LLM request.

Conversion rules (the trace rules themselves are :mod:`continuum_tiered.traces.build`'s):

- Attempts: a run retries an instance whose runtime failed, and every attempt's calls are
  logged. Within a conversation every prompt has more messages than the one before, so a
  call whose prompt has no more messages than the previous call's starts a new attempt;
  only the last attempt (the one that was evaluated) is kept.
- One call per completion file, in timestamp order, with the provider's token counts
  (``prompt_tokens`` is the whole prompt, cached part included).
- Request start of call k: the last step line after call k-1's response and at or before
  call k's response. The step lines' local clock is turned into Unix time by a whole-hour
  offset: the one under which every call has such a step line (the smallest total LLM
  latency breaks ties); a run can also state it.
- Tool duration of call k: request start of call k+1 minus the response time of call k,
  i.e. the recorded time the tool ran plus the controller's few milliseconds of
  bookkeeping. It is recorded, not sampled; the last call has none (0).
- Tool: the first tool call of the reply (OpenHands 0.15 with Claude made one per reply):
  ``execute_bash`` is named by the traces' tool naming rule
  (:func:`~continuum_tiered.core.hints.tool_from_reply` applied to the command as the
  reply's bash block; an empty command, which polls a running one, is ``bash``);
  ``str_replace_editor`` is ``read`` for ``view`` and ``edit`` otherwise, as OpenHands'
  own actions name them; ``finish``, ``think`` keep their names, ``execute_ipython_cell``
  is ``ipython``, ``browser`` is ``browse``; a reply without a tool call has none.

The compact file holds one program per line: ``program_id``, ``source`` and ``calls``, each
call with ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``tool``,
``start_s`` and ``end_s`` (request start and response time, seconds from the first
request, millisecond resolution) and ``tool_duration_s`` (``start_s`` of the next call
minus ``end_s``).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from continuum_tiered.core.hints import TOOL_RE, tool_from_reply
from continuum_tiered.traces.build import BuildOptions, Call, build_program, data_path
from continuum_tiered.traces.model import TraceError, TraceProgram, json_lines

EMBEDDED_PROGRAMS = "openhands_sonnet35_50.jsonl"
# The longest an LLM call is assumed to take when looking for its step line.
MAX_LATENCY_S = 1800.0
_STEP_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \w+ - \[Agent Controller [^\]]*\] "
    r"LEVEL 0 LOCAL STEP \d+"
)
_RENAMED_TOOLS = {"execute_ipython_cell": "ipython", "browser": "browse"}


@dataclass(frozen=True)
class Completion:
    """What the trace needs from one completion file."""

    time_s: float
    messages: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tool: str | None


@dataclass(frozen=True)
class RecordedCall:
    """One call of the compact file."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tool: str | None
    start_s: float
    end_s: float
    tool_duration_s: float

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def tool_name(function: str, arguments: str, where: str) -> str:
    """The trace's name of an OpenHands tool call, by the rules in the module docstring."""
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError as err:
        raise TraceError(f"{where}.arguments: not JSON ({err})") from err
    if not isinstance(args, dict):
        raise TraceError(f"{where}.arguments: expected a JSON object")
    if function == "execute_bash":
        command = args.get("command", "")
        if not isinstance(command, str):
            raise TraceError(f"{where}.arguments.command: expected a string")
        return tool_from_reply(f"```bash\n{command}\n```") or "bash"
    if function == "str_replace_editor":
        return "read" if args.get("command") == "view" else "edit"
    name = _RENAMED_TOOLS.get(function, function)
    return name if TOOL_RE.fullmatch(name) else "other"


def read_completion(data: object, where: str) -> Completion:
    """The call of a parsed completion file; errors name ``where`` and the field."""
    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected a JSON object")
    stamp = data.get("timestamp")
    if not _is_number(stamp):
        raise TraceError(f"{where} field timestamp: expected a number, got {stamp!r}")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise TraceError(f"{where} field messages: expected a list")
    response = _object(data.get("response"), f"{where} field response")
    usage = _object(response.get("usage"), f"{where} field response.usage")
    prompt = _count(usage, "prompt_tokens", 1, f"{where} field response.usage")
    completion = _count(usage, "completion_tokens", 0, f"{where} field response.usage")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if not _is_int(cached):
        cached = usage.get("cache_read_input_tokens", 0)
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise TraceError(f"{where} field response.choices: expected a non-empty list")
    message = _object(choices[0].get("message"), f"{where} field response.choices[0].message")
    return Completion(
        time_s=float(stamp),  # type: ignore[arg-type]
        messages=len(messages),
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached if _is_int(cached) and cached >= 0 else 0,
        tool=_reply_tool(message.get("tool_calls"), f"{where} field response.choices[0]"),
    )


def step_times(lines: Iterable[str]) -> list[float]:
    """The controller's step starts in a log, as Unix seconds of the log's local clock read
    as UTC (:func:`recorded_calls` finds the offset)."""
    times = []
    for line in lines:
        match = _STEP_RE.match(line)
        if match:
            local = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            times.append(local.replace(tzinfo=UTC).timestamp())
    return sorted(times)


def last_attempt(completions: Iterable[Completion]) -> list[Completion]:
    """The calls of the last conversation, in time order (see the module docstring)."""
    calls = sorted(completions, key=lambda c: c.time_s)
    start = 0
    for i in range(1, len(calls)):
        if calls[i].messages <= calls[i - 1].messages:
            start = i
    return calls[start:]


def recorded_calls(
    completions: Iterable[Completion],
    steps: Sequence[float],
    where: str,
    utc_offset_s: float | None = None,
) -> list[RecordedCall]:
    """The compact calls of one instance's completions and step lines: the last attempt,
    request starts from the step lines, recorded tool durations."""
    calls = last_attempt(completions)
    if not calls:
        raise TraceError(f"{where}: no completions")
    ends = [c.time_s for c in calls]
    if utc_offset_s is None:
        utc_offset_s = _utc_offset(ends, steps, where)
    starts = _request_starts(ends, [s + utc_offset_s for s in steps])
    missing = [i for i, s in enumerate(starts) if s is None]
    if missing:
        raise TraceError(
            f"{where}: no step line before call {missing[0]} (response at {ends[missing[0]]})"
        )
    origin = starts[0]
    start_s = [round(s - origin, 3) for s in starts]  # type: ignore[operator]
    end_s = [round(e - origin, 3) for e in ends]  # type: ignore[operator]
    return [
        RecordedCall(
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            cached_tokens=c.cached_tokens,
            tool=c.tool,
            start_s=start_s[i],
            end_s=end_s[i],
            tool_duration_s=round(start_s[i + 1] - end_s[i], 3) if i + 1 < len(calls) else 0.0,
        )
        for i, c in enumerate(calls)
    ]


class RecordedDurations:
    """A :class:`~continuum_tiered.traces.build.DurationSampler` that hands out one
    program's recorded durations in call order instead of drawing: ``build_program`` asks
    once per call but the last, in order, so the i-th request gets call i's duration (the
    tool and the RNG are ignored). One instance serves one program."""

    def __init__(self, durations: Iterable[float]) -> None:
        self._next: Iterator[float] = iter(durations)

    def sample(self, tool: str | None, rng: random.Random) -> float:
        return next(self._next)


def load_openhands(
    path: str | Path | None = None,
    options: BuildOptions | None = None,
    limit: int | None = None,
) -> list[TraceProgram]:
    """Programs of a compact OpenHands file (default: the embedded one), with the recorded
    tool durations."""
    path = Path(path or data_path(EMBEDDED_PROGRAMS))
    options = options or BuildOptions()
    programs: list[TraceProgram] = []
    for where, record in json_lines(path):
        if limit is not None and len(programs) >= limit:
            break
        program_id, calls = _compact_record(record, where)
        turns = [Call(c.prompt_tokens, c.completion_tokens, c.tool) for c in calls]
        durations = RecordedDurations(c.tool_duration_s for c in calls)
        programs.append(build_program(program_id, turns, durations, options))
    if not programs:
        raise TraceError(f"{path}: no programs")
    return programs


def _compact_record(record: object, where: str) -> tuple[str, list[RecordedCall]]:
    if not isinstance(record, dict):
        raise TraceError(f"{where}: expected a JSON object")
    program_id = record.get("program_id")
    if not isinstance(program_id, str) or not program_id:
        raise TraceError(f"{where} field program_id: expected a non-empty string")
    raw_calls = record.get("calls")
    at = f"{where} program {program_id!r} field calls"
    if not isinstance(raw_calls, list) or not raw_calls:
        raise TraceError(f"{at}: expected a non-empty list")
    return program_id, [_compact_call(raw, f"{at}[{i}]") for i, raw in enumerate(raw_calls)]


def _compact_call(raw: object, at: str) -> RecordedCall:
    call = _object(raw, at)
    tool = call.get("tool")
    if tool is not None and not isinstance(tool, str):
        raise TraceError(f"{at}.tool: expected a string or null, got {tool!r}")
    times = {}
    for name in ("start_s", "end_s", "tool_duration_s"):
        value = call.get(name)
        if not _is_number(value) or value < 0:  # type: ignore[operator]
            raise TraceError(f"{at}.{name}: expected a number >= 0, got {value!r}")
        times[name] = float(value)  # type: ignore[arg-type]
    return RecordedCall(
        prompt_tokens=_count(call, "prompt_tokens", 1, at),
        completion_tokens=_count(call, "completion_tokens", 0, at),
        cached_tokens=_count(call, "cached_tokens", 0, at),
        tool=tool,
        **times,
    )


def _reply_tool(tool_calls: object, at: str) -> str | None:
    if tool_calls is None or tool_calls == []:
        return None
    if not isinstance(tool_calls, list):
        raise TraceError(f"{at}.message.tool_calls: expected a list")
    first = tool_calls[0]
    function = first.get("function") if isinstance(first, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise TraceError(f"{at}.message.tool_calls[0].function.name: expected a string")
    arguments = function.get("arguments", "")
    if not isinstance(arguments, str):
        raise TraceError(f"{at}.message.tool_calls[0].function.arguments: expected a string")
    return tool_name(function["name"], arguments, f"{at}.message.tool_calls[0].function")


def _request_starts(ends: Sequence[float], steps: Sequence[float]) -> list[float | None]:
    """For each response time, the last step in (previous response, this response]."""
    starts: list[float | None] = []
    for i, end in enumerate(ends):
        after = ends[i - 1] if i else end - MAX_LATENCY_S
        inside = [s for s in steps if after < s <= end]
        starts.append(inside[-1] if inside else None)
    return starts


def _utc_offset(ends: Sequence[float], steps: Sequence[float], where: str) -> float:
    best: tuple[float, float] | None = None
    for hours in range(-14, 15):
        offset = hours * 3600.0
        starts = _request_starts(ends, [s + offset for s in steps])
        if all(s is not None for s in starts):
            latency = sum(e - s for e, s in zip(ends, starts, strict=True))  # type: ignore[operator]
            if best is None or latency < best[0]:
                best = (latency, offset)
    if best is None:
        raise TraceError(f"{where}: no whole-hour clock offset matches the step lines to calls")
    return best[1]


def _object(value: object, at: str) -> dict:
    if not isinstance(value, dict):
        raise TraceError(f"{at}: expected a JSON object")
    return value


def _count(data: dict, name: str, minimum: int, at: str) -> int:
    value = data.get(name)
    if not _is_int(value) or value < minimum:  # type: ignore[operator]
        raise TraceError(f"{at}.{name}: expected an integer >= {minimum}, got {value!r}")
    return value  # type: ignore[return-value]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]
