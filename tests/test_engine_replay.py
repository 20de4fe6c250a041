"""The in-process real-time replay on the CPU build of vLLM: one engine for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm.v1.engine.llm_engine import LLMEngine

from continuum_tiered.lab.in_process_replay import (
    InProcessSetup,
    RealTimeReplay,
    fresh_tokens,
    reset_prefix_cache,
    served_engine,
)
from continuum_tiered.traces.model import TraceProgram, Turn

KV_BLOCKS = 64
PROGRAMS = [
    TraceProgram(
        "prog-a",
        (Turn(70, 4, "ls", 0.3), Turn(110, 4, "grep", 0.2), Turn(150, 3, None, 0.0)),
        arrival_s=0.0,
    ),
    TraceProgram("prog-b", (Turn(90, 5, "cat", 0.4), Turn(130, 2, None, 0.0)), arrival_s=0.1),
]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path) -> InProcessSetup:
    return InProcessSetup(
        tiny_model_dir,
        KV_BLOCKS,
        max_num_batched_tokens=512,
        max_num_seqs=8,
        policy="continuum",
    )


@pytest.fixture(scope="module")
def engine(setup: InProcessSetup) -> Iterator[LLMEngine]:
    with served_engine(setup) as engine:
        yield engine


def test_turns_complete_and_tool_pauses_are_respected(engine: LLMEngine, setup: InProcessSetup):
    done: list[str] = []
    records = RealTimeReplay(engine, PROGRAMS, setup.vocab_size, seed=0).run(
        lambda record: done.append(record.program_id)
    )
    assert sorted(done) == ["prog-a", "prog-b"]
    for program, record in zip(PROGRAMS, records, strict=True):
        assert record.program_id == program.program_id and record.error is None
        assert [t.prompt_tokens for t in record.turns] == [t.prompt_tokens for t in program.turns]
        assert [t.output_tokens for t in record.turns] == [t.output_tokens for t in program.turns]
        tools = sum(turn.tool_duration_s for turn in program.turns[:-1])
        assert record.jct_s > 0 and record.jct_s >= tools
        assert record.start_s >= program.arrival_s
        # Each later turn extends the previous prompt and reply: the prefix is cached.
        assert all(t.cached_tokens > 0 for t in record.turns[1:])
        assert all(0 < t.ttft_s <= t.latency_s for t in record.turns)
    # Every pin is released at its program's end: the cache can be emptied again.
    reset_prefix_cache(engine)


def test_fresh_tokens_are_seeded_per_program_and_turn():
    a = fresh_tokens(seed=0, seq=1, turn=2, count=50, vocab_size=512)
    assert a == fresh_tokens(0, 1, 2, 50, 512) and a != fresh_tokens(0, 1, 3, 50, 512)
    assert all(3 <= t < 512 for t in a)
