"""SWE-bench programs from ../shared/traces in the trace format.

Conversion choices (see ../shared/traces/README.md for the data):

- Prompts are made prefix extensions: ``prompt[i] = max(recorded prompt[i],
  prompt[i-1] + output[i-1])``. The provider's count sometimes shrinks between calls
  (down to -872 tokens) and the recorded output includes hidden reasoning that the next
  prompt does not; both are absorbed by the max.
- Outputs are capped at ``max_output_tokens`` (one call generated 65,536 tokens).
- Tool durations come from another real agent run: each call's duration is drawn from
  that tool's recorded durations, or from all durations when the tool has none, with a
  seeded RNG per program so a trace is reproducible.
- ``token_scale`` shrinks every token count (at least 1 token) for small CPU runs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from continuum_tiered.traces.model import TraceError, TraceProgram, Turn

EMBEDDED_PROGRAMS = "swebench_gemini3_50.jsonl"
EMBEDDED_DURATIONS = "swe_tool_durations.json"


def _data_path(name: str) -> Path:
    return Path(str(resources.files("continuum_tiered") / "data" / name))


@dataclass(frozen=True)
class ToolDurations:
    by_tool: dict[str, list[float]]
    all: list[float]

    @classmethod
    def load(cls, path: str | Path | None = None) -> ToolDurations:
        data = json.loads(Path(path or _data_path(EMBEDDED_DURATIONS)).read_text())
        return cls(by_tool=data["tools"], all=data["all"])

    def sample(self, tool: str | None, rng: random.Random) -> float:
        return rng.choice(self.by_tool.get(tool or "", None) or self.all)


@dataclass(frozen=True)
class SwebenchOptions:
    token_scale: float = 1.0
    max_output_tokens: int = 8192
    max_turns: int | None = None
    seed: int = 0


def load_swebench(
    path: str | Path | None = None,
    durations: ToolDurations | None = None,
    options: SwebenchOptions | None = None,
    limit: int | None = None,
) -> list[TraceProgram]:
    """Programs of the compact SWE-bench file (default: the 50 embedded ones)."""
    path = Path(path or _data_path(EMBEDDED_PROGRAMS))
    durations = durations or ToolDurations.load()
    options = options or SwebenchOptions()
    programs = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and len(programs) >= limit:
                break
            try:
                record = json.loads(line)
                calls = record["calls"]
                program_id = record["program_id"]
            except (ValueError, KeyError, TypeError) as err:
                raise TraceError(f"{path} line {number}: not a SWE-bench program ({err})") from err
            rng = random.Random(f"{options.seed}:{program_id}")
            programs.append(
                _convert(program_id, calls, durations, options, rng, f"{path}:{number}")
            )
    return programs


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _convert(
    program_id: str,
    calls: list[dict],
    durations: ToolDurations,
    options: SwebenchOptions,
    rng: random.Random,
    where: str,
) -> TraceProgram:
    if options.max_turns is not None:
        calls = calls[: options.max_turns]
    turns: list[Turn] = []
    for i, call in enumerate(calls):
        try:
            prompt = _scaled(int(call["prompt_tokens"]), options.token_scale)
            output = _scaled(
                min(int(call["completion_tokens"]), options.max_output_tokens), options.token_scale
            )
            tool = call.get("tool")
        except (KeyError, TypeError, ValueError) as err:
            raise TraceError(f"{where} call {i}: {err}") from err
        if turns:
            prompt = max(prompt, turns[-1].prompt_tokens + turns[-1].output_tokens)
        last = i == len(calls) - 1
        pause = 0.0 if last else durations.sample(tool, rng)
        turns.append(Turn(prompt, output, tool, pause))
    return TraceProgram(program_id, tuple(turns))
