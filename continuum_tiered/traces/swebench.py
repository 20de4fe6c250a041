"""SWE-bench programs from ../shared/traces in the trace format.

The compact file already holds per-call provider token counts and tool names (see
../shared/traces/README.md); the conversion rules are :mod:`continuum_tiered.traces.build`'s.
Tool durations come from another real agent run (:class:`ToolDurations`): pairing them
with this run's tool names is a modelling choice.
"""

from __future__ import annotations

import json
from pathlib import Path

from continuum_tiered.traces.build import (
    BuildOptions,
    Call,
    ToolDurations,
    build_program,
    data_path,
)
from continuum_tiered.traces.model import TraceError, TraceProgram

EMBEDDED_PROGRAMS = "swebench_gemini3_50.jsonl"

# The options' name from before the builder was shared with the other loaders.
SwebenchOptions = BuildOptions


def load_swebench(
    path: str | Path | None = None,
    durations: ToolDurations | None = None,
    options: BuildOptions | None = None,
    limit: int | None = None,
) -> list[TraceProgram]:
    """Programs of the compact SWE-bench file (default: the 50 embedded ones)."""
    path = Path(path or data_path(EMBEDDED_PROGRAMS))
    durations = durations or ToolDurations.load()
    options = options or BuildOptions()
    programs = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(programs) >= limit:
                break
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
                program_id = record["program_id"]
                calls = [_call(call) for call in record["calls"]]
            except (ValueError, KeyError, TypeError) as err:
                raise TraceError(f"{where}: not a SWE-bench program ({err!r})") from err
            programs.append(build_program(program_id, calls, durations, options))
    return programs


def _call(record: dict) -> Call:
    return Call(int(record["prompt_tokens"]), int(record["completion_tokens"]), record.get("tool"))
