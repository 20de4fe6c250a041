"""mini-swe-agent 1.x trajectories (``*.traj.json``, upstream format) in the trace format.

A trajectory (``"trajectory_format": "mini-swe-agent-1"``) holds the whole conversation in
``messages``: a system prompt, the task as a user message, then alternating assistant
replies (one LLM call each) and user messages carrying the tool output. Each assistant
message keeps the provider's response in ``extra.response``, whose ``usage`` has the
call's ``prompt_tokens`` and ``completion_tokens``.

Conversion choices (the trace rules themselves are :mod:`continuum_tiered.traces.build`'s):

- One turn per assistant message, in order.
- Tokens: the provider's ``usage`` counts when the message has them (the completion count
  includes hidden reasoning). Without them both are estimated at 4 characters per token:
  the prompt from the text of every message before the call, the output from the
  reply's visible text.
- Tool: :func:`continuum_tiered.core.hints.tool_from_reply` on the reply, except that the last
  call of a trajectory whose ``info.exit_status`` is ``"Submitted"`` is the submission and
  has no tool, as in the compact SWE-bench file.
- Tool durations: drawn per tool from :class:`ToolDurations` (a different agent run).
- ``program_id``: the trajectory's ``instance_id``, else the file name without
  ``.traj.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from continuum_tiered.core.hints import tool_from_reply
from continuum_tiered.traces.build import (
    BuildOptions,
    Call,
    ToolDurations,
    build_program,
    estimate_tokens,
)
from continuum_tiered.traces.model import TraceError, TraceProgram

SUFFIX = ".traj.json"
FORMAT = "mini-swe-agent-1"


def trajectory_files(paths: Iterable[str | Path]) -> list[Path]:
    """The trajectory files named by ``paths``: files as given, folders expanded to their
    ``*.traj.json`` files in name order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob(f"*{SUFFIX}"))
            if not found:
                raise TraceError(f"{path}: no {SUFFIX} files")
            files += found
        else:
            files.append(path)
    return files


def load_miniswe(
    paths: Iterable[str | Path],
    durations: ToolDurations | None = None,
    options: BuildOptions | None = None,
) -> list[TraceProgram]:
    """One program per trajectory file (folders expand to their ``*.traj.json``)."""
    durations = durations or ToolDurations.load()
    options = options or BuildOptions()
    programs = []
    for path in trajectory_files(paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise TraceError(f"{path}: not a readable JSON file ({err})") from err
        program_id = path.name.removesuffix(SUFFIX)
        if isinstance(data, dict) and isinstance(data.get("instance_id"), str):
            program_id = data["instance_id"]
        calls = trajectory_calls(data, str(path))
        programs.append(build_program(program_id, calls, durations, options))
    return programs


def trajectory_calls(data: object, where: str) -> list[Call]:
    """The LLM calls of a parsed trajectory; errors name ``where`` and the field."""
    if not isinstance(data, dict):
        raise TraceError(f"{where}: expected a JSON object")
    fmt = data.get("trajectory_format", FORMAT)
    if fmt != FORMAT:
        raise TraceError(f"{where} field trajectory_format: {fmt!r}, only {FORMAT!r} is read")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise TraceError(f"{where} field messages: expected a list")
    calls: list[Call] = []
    context_chars = 0
    for i, message in enumerate(messages):
        at = f"{where} field messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TraceError(f"{at}: expected an object with a role")
        text = _text(message.get("content"), at)
        if message["role"] == "assistant":
            usage = _usage(message, at)
            if usage is None:
                usage = (estimate_tokens(context_chars), estimate_tokens(len(text)))
            calls.append(Call(usage[0], usage[1], tool_from_reply(text)))
        context_chars += len(text)
    if not calls:
        raise TraceError(f"{where} field messages: no assistant message")
    info = data.get("info")
    if isinstance(info, dict) and info.get("exit_status") == "Submitted":
        calls[-1] = Call(calls[-1].prompt_tokens, calls[-1].output_tokens, None)
    return calls


def _text(content: object, at: str) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    raise TraceError(f"{at}.content: expected a string or a list of parts")


def _usage(message: dict, at: str) -> tuple[int, int] | None:
    """The provider's (prompt, completion) counts of an assistant message, if recorded."""
    extra = message.get("extra")
    response = extra.get("response") if isinstance(extra, dict) else None
    usage = response.get("usage") if isinstance(response, dict) else None
    if usage is None:
        return None
    if not isinstance(usage, dict):
        raise TraceError(f"{at}.extra.response.usage: expected an object")
    counts = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise TraceError(f"{at}.extra.response.usage: token counts must be integers >= 0")
    return counts  # type: ignore[return-value]
