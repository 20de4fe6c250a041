"""Run trace programs as agents against an OpenAI-compatible server, in real time.

Each program sends its turns one after another: the prompt as token ids (the previous
prompt, the previous reply's token ids, then fresh ids up to the trace's prompt length,
so the prefix structure is exact), ``max_tokens`` = the trace's output with
``ignore_eos``, then sleeps the tool's duration before the next turn.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from openai import AsyncOpenAI

from continuum_tiered.client import AgentProgram
from continuum_tiered.traces.model import TraceProgram


@dataclass
class TurnRecord:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    latency_s: float


@dataclass
class ProgramRecord:
    program_id: str
    start_s: float
    end_s: float = 0.0
    turns: list[TurnRecord] = field(default_factory=list)
    error: str | None = None

    @property
    def jct_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def prefix_hit_tokens(self) -> int:
        return sum(t.cached_tokens for t in self.turns)

    @property
    def prompt_tokens(self) -> int:
        return sum(t.prompt_tokens for t in self.turns)


@dataclass(frozen=True)
class RunnerOptions:
    model: str
    send_hints: bool
    vocab: tuple[int, int] = (3, 500)  # token ids drawn for new context: [low, high)
    time_scale: float = 1.0  # multiplies tool durations and arrival offsets
    seed: int = 0


async def run_program(
    client: AsyncOpenAI, program: TraceProgram, options: RunnerOptions, t0: float
) -> ProgramRecord:
    await asyncio.sleep(program.arrival_s * options.time_scale)
    rng = random.Random(f"{options.seed}:{program.program_id}")
    agent = AgentProgram(program_id=program.program_id)
    record = ProgramRecord(program.program_id, start_s=time.monotonic() - t0)
    context: list[int] = []
    try:
        for i, turn in enumerate(program.turns):
            last = i == len(program.turns) - 1
            context += [
                rng.randrange(*options.vocab) for _ in range(turn.prompt_tokens - len(context))
            ]
            body = {"ignore_eos": True, "return_token_ids": True}
            if options.send_hints:
                body |= agent.extra_body(last_turn=last, tool=turn.tool)
                agent.turn += 1
            sent = time.monotonic()
            response = await client.completions.create(
                model=options.model, prompt=context, max_tokens=turn.output_tokens, extra_body=body
            )
            choice = response.choices[0]
            details = response.usage.prompt_tokens_details if response.usage else None
            record.turns.append(
                TurnRecord(
                    prompt_tokens=len(context),
                    cached_tokens=(details.cached_tokens or 0) if details else 0,
                    output_tokens=len(choice.token_ids or []),
                    latency_s=time.monotonic() - sent,
                )
            )
            context += list(choice.token_ids or [])
            if not last:
                await asyncio.sleep(turn.tool_duration_s * options.time_scale)
    except Exception as err:  # a failed program is recorded, never fatal to the run
        record.error = f"{type(err).__name__}: {err}"
    record.end_s = time.monotonic() - t0
    return record


async def run_programs(
    base_url: str, programs: Sequence[TraceProgram], options: RunnerOptions
) -> list[ProgramRecord]:
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=2) as client:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(run_program(client, p, options, t0) for p in programs)))
