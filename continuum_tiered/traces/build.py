"""Turning a source's LLM calls into a :class:`TraceProgram`: the rules every loader shares.

- Prompts are made prefix extensions: ``prompt[i] = max(prompt[i], prompt[i-1] +
  output[i-1])``. Recorded counts sometimes shrink between calls (a provider's count
  varies) and recorded outputs include hidden reasoning that the next prompt does not
  carry; both are absorbed by the max.
- Outputs are capped at ``max_output_tokens`` (one SWE-bench call generated 65,536).
- ``token_scale`` multiplies every token count (rounded, at least 1) for small runs;
  scaling happens before the max, so scaled prompts still extend.
- Each call's tool duration is drawn by a :class:`DurationSampler` with an RNG seeded by
  ``(seed, program_id)``, so a program is reproducible whatever else is loaded with it.
  The last call's duration is 0: nothing follows it.
- Where a source has no token counts, :func:`estimate_tokens` counts 4 characters per
  token (the usual rule of thumb for English text and code with BPE tokenizers).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

from continuum_tiered.traces.model import TraceProgram, Turn

CHARS_PER_TOKEN = 4
EMBEDDED_DURATIONS = "swe_tool_durations.json"


def data_path(name: str) -> Path:
    """A file of the package's embedded ``data`` folder."""
    return Path(str(resources.files("continuum_tiered") / "data" / name))


def estimate_tokens(chars: int) -> int:
    """Tokens of a text of ``chars`` characters where no tokenizer count exists:
    ``ceil(chars / 4)``."""
    return math.ceil(chars / CHARS_PER_TOKEN)


@dataclass(frozen=True)
class Call:
    """One LLM call of a source, before the trace rules apply."""

    prompt_tokens: int
    output_tokens: int
    tool: str | None


@dataclass(frozen=True)
class BuildOptions:
    token_scale: float = 1.0
    max_output_tokens: int = 8192
    max_turns: int | None = None
    seed: int = 0


class DurationSampler(Protocol):
    def sample(self, tool: str | None, rng: random.Random) -> float:
        """Seconds the tool runs after the call that invoked it."""
        ...


@dataclass(frozen=True)
class ToolDurations:
    """Recorded SWE-bench tool durations (``swe_tool_durations.json``): a call's duration
    is drawn from its tool's samples, or from all samples when the tool has none."""

    by_tool: dict[str, list[float]]
    all: list[float]

    @classmethod
    def load(cls, path: str | Path | None = None) -> ToolDurations:
        data = json.loads(Path(path or data_path(EMBEDDED_DURATIONS)).read_text())
        return cls(by_tool=data["tools"], all=data["all"])

    def sample(self, tool: str | None, rng: random.Random) -> float:
        return rng.choice(self.by_tool.get(tool or "", None) or self.all)


def program_rng(seed: int, program_id: str) -> random.Random:
    return random.Random(f"{seed}:{program_id}")


def build_program(
    program_id: str,
    calls: Sequence[Call],
    durations: DurationSampler,
    options: BuildOptions,
) -> TraceProgram:
    """The trace program of a source's calls, by the rules in this module's docstring."""
    if options.max_turns is not None:
        calls = calls[: options.max_turns]
    rng = program_rng(options.seed, program_id)
    pauses = [
        0.0 if i == len(calls) - 1 else durations.sample(call.tool, rng)
        for i, call in enumerate(calls)
    ]
    turns = _extend_prompts(
        ((c.prompt_tokens, c.output_tokens, c.tool, p) for c, p in zip(calls, pauses, strict=True)),
        options.token_scale,
        options.max_output_tokens,
    )
    return TraceProgram(program_id, turns)


def rescale(program: TraceProgram, token_scale: float) -> TraceProgram:
    """``program`` with every token count scaled, pauses and tools kept."""
    turns = _extend_prompts(
        ((t.prompt_tokens, t.output_tokens, t.tool, t.tool_duration_s) for t in program.turns),
        token_scale,
        None,
    )
    return TraceProgram(program.program_id, turns, program.arrival_s)


def _extend_prompts(
    calls: Iterable[tuple[int, int, str | None, float]],
    token_scale: float,
    max_output_tokens: int | None,
) -> tuple[Turn, ...]:
    """Turns of ``(prompt, output, tool, pause)``: outputs capped, counts scaled, prompts
    raised to extend the previous prompt and output."""
    turns: list[Turn] = []
    for prompt, output, tool, pause in calls:
        if max_output_tokens is not None:
            output = min(output, max_output_tokens)
        prompt, output = _scaled(prompt, token_scale), _scaled(output, token_scale)
        if turns:
            prompt = max(prompt, turns[-1].prompt_tokens + turns[-1].output_tokens)
        turns.append(Turn(prompt, output, tool, pause))
    return tuple(turns)


def _scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))
