"""Run trace programs as agents against an OpenAI-compatible server, in real time.

Each program sends its turns one after another: the prompt as token ids (the previous
prompt, the previous reply's token ids, then fresh ids up to the trace's prompt length,
so the prefix structure is exact), ``max_tokens`` = the trace's output with
``ignore_eos``, then sleeps the tool's duration before the next turn.

Replies are streamed so that each turn's time to first token (queueing plus prefill, the
delay that a lost prefix or a long queue adds) is measured apart from decoding. A failed
request is retried with exponential backoff within :class:`RetryPolicy`'s bounds; a turn
that still fails ends its program, recorded with the error, and the others go on.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai import AsyncOpenAI

from continuum_tiered.client.agent_program import AgentProgram
from continuum_tiered.core.metrics import ProgramOutcome, RunSummary, summarize
from continuum_tiered.traces.model import TraceProgram


@dataclass
class TurnRecord:
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    latency_s: float  # first send to last token, retries and backoff included
    ttft_s: float  # first send to first token: queueing and prefill (and any retries)
    attempts: int


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

    def outcome(self) -> ProgramOutcome:
        queue_s = sum(t.ttft_s for t in self.turns)
        return ProgramOutcome(
            self.start_s,
            self.end_s,
            len(self.turns),
            queue_s,
            self.prompt_tokens,
            self.prefix_hit_tokens,
        )


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one turn's request is tried before its program is given up."""

    attempts: int = 4
    backoff_s: float = 0.5  # pause after the first failed attempt, doubled after each next one
    max_total_s: float = 60.0  # no new attempt once the turn has taken this long
    request_timeout_s: float = 600.0  # one attempt, from send to the last streamed token

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be >= 1, got {self.attempts}")
        for name in ("backoff_s", "max_total_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class RunnerOptions:
    model: str
    send_hints: bool  # program priority and connector hints; off for servers that reject them
    # The routing header naming the program; off (with send_hints off): nothing names it,
    # as an unmodified agent sends, for a proxy or server to find it from the conversation.
    send_routing_key: bool = True
    vocab: tuple[int, int] = (3, 500)  # token ids drawn for new context: [low, high)
    time_scale: float = 1.0  # multiplies tool durations
    seed: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class TurnFailed(Exception):
    """A turn's request failed for good: not retryable, or out of attempts or time."""


def is_retryable(err: BaseException) -> bool:
    """Transport failures, timeouts, errors streamed mid-reply, 408, 429 and 5xx answers."""
    if isinstance(err, openai.APIStatusError):
        return err.status_code in (408, 429) or err.status_code >= 500
    return isinstance(err, openai.APIError | httpx.TransportError | TimeoutError)


@dataclass
class _Reply:
    first_token_at: float
    token_ids: list[int]
    usage: Any  # openai CompletionUsage, or None from servers that send no usage


async def _stream_once(
    client: AsyncOpenAI,
    options: RunnerOptions,
    prompt: list[int],
    max_tokens: int,
    body: dict[str, Any],
    headers: dict[str, str],
) -> _Reply:
    first_token_at: float | None = None
    token_ids: list[int] = []
    usage = None
    async with asyncio.timeout(options.retry.request_timeout_s):
        stream = await client.completions.create(
            model=options.model,
            prompt=prompt,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
            extra_headers=headers,
        )
        async with stream:
            async for chunk in stream:
                if chunk.choices:
                    first_token_at = first_token_at or time.monotonic()
                    token_ids += chunk.choices[0].token_ids or []  # type: ignore[attr-defined]
                if chunk.usage:
                    usage = chunk.usage
    # A reply streamed without a token chunk counts as waiting until its end.
    return _Reply(first_token_at or time.monotonic(), token_ids, usage)


async def run_turn(
    client: AsyncOpenAI,
    options: RunnerOptions,
    prompt: list[int],
    max_tokens: int,
    body: dict[str, Any],
    headers: dict[str, str],
) -> tuple[TurnRecord, list[int]]:
    """One turn, retried per ``options.retry``; its record and the reply's token ids."""
    retry = options.retry
    sent = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            reply = await _stream_once(client, options, prompt, max_tokens, body, headers)
            break
        except Exception as err:
            delay = retry.backoff_s * 2 ** (attempt - 1)
            out_of_time = time.monotonic() - sent + delay > retry.max_total_s
            if not is_retryable(err) or attempt == retry.attempts or out_of_time:
                reason = (
                    f"no complete reply within {retry.request_timeout_s:g} s"
                    if isinstance(err, TimeoutError)
                    else str(err)
                )
                raise TurnFailed(
                    f"{type(err).__name__}: {reason} (attempt {attempt} of {retry.attempts})"
                ) from err
            await asyncio.sleep(delay)
    usage = reply.usage
    details = usage.prompt_tokens_details if usage else None
    record = TurnRecord(
        prompt_tokens=len(prompt),
        cached_tokens=(details.cached_tokens or 0) if details else 0,
        output_tokens=usage.completion_tokens if usage else len(reply.token_ids),
        latency_s=time.monotonic() - sent,
        ttft_s=reply.first_token_at - sent,
        attempts=attempt,
    )
    return record, reply.token_ids


async def run_program(
    client: AsyncOpenAI, program: TraceProgram, options: RunnerOptions, t0: float
) -> ProgramRecord:
    await asyncio.sleep(max(0.0, t0 + program.arrival_s - time.monotonic()))
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
            # The routing key goes with every system's requests: a router in front of
            # vanilla vLLM keeps programs on one replica too.
            headers = agent.routing_headers() if options.send_routing_key else {}
            turn_record, reply = await run_turn(
                client, options, context, turn.output_tokens, body, headers
            )
            record.turns.append(turn_record)
            context += reply
            if not last:
                await asyncio.sleep(turn.tool_duration_s * options.time_scale)
    except TurnFailed as err:  # a failed program is recorded, never fatal to the run
        record.error = f"turn {len(record.turns)}: {err}"
    record.end_s = time.monotonic() - t0
    return record


async def run_programs(
    base_url: str,
    programs: Sequence[TraceProgram],
    options: RunnerOptions,
    on_done: Callable[[ProgramRecord], None] = lambda record: None,
) -> list[ProgramRecord]:
    """Every program from its ``arrival_s`` (seconds after the start), concurrently."""
    async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0) as client:
        t0 = time.monotonic()

        async def one(program: TraceProgram) -> ProgramRecord:
            record = await run_program(client, program, options, t0)
            on_done(record)
            return record

        return list(await asyncio.gather(*(one(p) for p in programs)))


def summarize_records(policy: str, jps: float, records: Sequence[ProgramRecord]) -> RunSummary:
    """The run's summary over its completed programs (failed ones are counted apart)."""
    return summarize(policy, jps, [r.outcome() for r in records if r.error is None])
