"""Real-time replay of agent programs on vLLM's engine in this process: no HTTP, no client.

The engine is vLLM's ``LLMEngine`` configured as ``continuum-tiered serve`` configures its
server: the plugin's connector config (:meth:`ServeOptions.connector_config`), program FCFS
(``scheduling_policy="priority"``, priority = the program's arrival order, as the
virtual replay's ``continuum`` peer gives it) and the CPU build's core reservation
(:func:`cpu_core_reservation`). Its engine core runs in a process of its own, as a
server's does and as ``continuum-tiered profile --engine`` timed its steps; this process
only adds requests and reads each step's outputs.

Every turn of a program is one request, built as the virtual replay
(:mod:`continuum_tiered.sim.virtual_engine`) builds it: the previous prompt, the previous reply's
token ids, then fresh ids up to the trace's prompt length drawn from the same seeds;
``max_tokens`` is the trace's output, with ``ignore_eos``; the program hints ride in
``kv_transfer_params``. A program's next turn is added ``tool_duration_s`` of wall-clock
time after the step that finished its previous turn was read: tool calls are real pauses.
A program's JCT runs from its first turn's submission to its last turn's finish.

One difference from the virtual replay's loop remains: requests are added between two
``step()`` calls, and ``step()`` waits for the engine core's next outputs, so a turn that
falls due during a step is added when that step's outputs arrive (the virtual replay adds
it before the next ``schedule()``, which is the same point for an engine that steps one
batch at a time).
"""

from __future__ import annotations

import heapq
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.llm_engine import LLMEngine

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.server_process import BLOCK_SIZE, tiny_max_model_len
from continuum_tiered.replay.runner import ProgramRecord, TurnRecord
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.vllm.serve import ServeOptions, cpu_core_reservation

FIRST_TOKEN_ID = 3  # below: the tiny model's special tokens (as the virtual replay draws)
WARM_UP_TOKENS = 4 * BLOCK_SIZE


@dataclass(frozen=True)
class InProcessSetup:
    """The served engine: a random-weight model on the CPU build with a fixed KV pool, and
    the plugin's retention policy and profile (None: the connector's defaults)."""

    model_dir: Path
    kv_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    policy: str | None = None
    profile: str | None = None
    policy_options: Mapping[str, object] = field(default_factory=dict)
    max_model_len: int | None = None  # None: the whole pool (one KV cache group)

    @property
    def vocab_size(self) -> int:
        return int(json.loads((self.model_dir / "config.json").read_text())["vocab_size"])

    def engine_args(self) -> EngineArgs:
        serve = ServeOptions(
            model=str(self.model_dir),
            policy=self.policy,
            profile=self.profile,
            policy_options=dict(self.policy_options),
        )
        return EngineArgs(
            model=str(self.model_dir),
            skip_tokenizer_init=True,
            load_format="dummy",
            enforce_eager=True,
            block_size=BLOCK_SIZE,
            num_gpu_blocks_override=self.kv_blocks,
            max_model_len=self.max_model_len or tiny_max_model_len(self.model_dir, self.kv_blocks),
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            enable_prefix_caching=True,
            scheduling_policy="priority",
            kv_transfer_config=KVTransferConfig(**serve.connector_config()),
            # On the CPU build: the share of host memory set aside for KV (the pool is fixed).
            gpu_memory_utilization=0.15,
        )


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` while the engine's processes start, then as before."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def served_engine(setup: InProcessSetup) -> Iterator[LLMEngine]:
    """The engine of :class:`InProcessSetup`, warmed up by one request and with an empty
    prefix cache; shut down on exit."""
    with _environment(cpu_core_reservation([])):
        engine = LLMEngine.from_engine_args(setup.engine_args())
    try:
        warm_up(engine, setup.vocab_size)
        yield engine
    finally:
        engine.engine_core.shutdown()


def warm_up(engine: LLMEngine, vocab_size: int) -> None:
    """One prefill and a few decode steps (the first steps of a fresh engine pay one-time
    costs), then a prefix cache as empty as at start."""
    timed_request(engine, vocab_size, WARM_UP_TOKENS, max_tokens=8)


def timed_request(engine: LLMEngine, vocab_size: int, prompt_tokens: int, max_tokens: int) -> float:
    """Seconds from adding one request alone to its last token; the prefix cache is emptied
    afterwards. On an idle engine: a probe of how fast the engine steps right now."""
    prompt = [FIRST_TOKEN_ID + k % (vocab_size - FIRST_TOKEN_ID) for k in range(prompt_tokens)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    engine.add_request("probe", TokensPrompt(prompt_token_ids=prompt), params)
    while engine.has_unfinished_requests():
        engine.step()
    seconds = time.perf_counter() - start
    reset_prefix_cache(engine)
    return seconds


def reset_prefix_cache(engine: LLMEngine) -> None:
    """Empty the prefix cache; it refuses while the connector pins blocks
    (docs/architecture.md, 'Prefix-cache reset')."""
    if not engine.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache: blocks are still held")


def fresh_tokens(seed: int, seq: int, turn: int, count: int, vocab_size: int) -> list[int]:
    """The new token ids of a program's turn, as the virtual replay draws them
    (``VirtualEngine._submit``), so both replays send the same prompts' fresh parts."""
    rng = random.Random(f"{seed}:{seq}:{turn}")
    return [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(count)]


@dataclass
class _Program:
    program: TraceProgram
    seq: int  # arrival order: the priority (program FCFS)
    record: ProgramRecord
    context: list[int] = field(default_factory=list)
    turn: int = 0
    sent_s: float = 0.0  # the current turn's submission
    first_token_s: float | None = None
    reply: list[int] = field(default_factory=list)


class RealTimeReplay:
    """The programs on ``engine`` in wall-clock time (times in seconds from the start)."""

    def __init__(
        self, engine: LLMEngine, programs: Sequence[TraceProgram], vocab_size: int, seed: int
    ):
        self.engine = engine
        self.vocab_size = vocab_size
        self.seed = seed
        ordered = sorted(programs, key=lambda p: p.arrival_s)
        self.programs = [
            _Program(p, seq, ProgramRecord(p.program_id, p.arrival_s))
            for seq, p in enumerate(ordered)
        ]
        self._due = [(p.arrival_s, seq) for seq, p in enumerate(ordered)]
        heapq.heapify(self._due)
        self._running: dict[str, _Program] = {}
        self._t0 = 0.0

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def run(self, on_done: Callable[[ProgramRecord], None] = lambda _: None) -> list[ProgramRecord]:
        """Every program to its end; their records in arrival order."""
        self._t0 = time.monotonic()
        while self._due or self.engine.has_unfinished_requests():
            self._submit_due()
            if self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    self._on_output(output, on_done)
            elif self._due:
                time.sleep(max(0.0, self._due[0][0] - self._now()))
        return [p.record for p in self.programs]

    def _submit_due(self) -> None:
        while self._due and self._due[0][0] <= self._now():
            _, seq = heapq.heappop(self._due)
            self._submit(self.programs[seq])

    def _submit(self, state: _Program) -> None:
        turn = state.program.turns[state.turn]
        fresh = turn.prompt_tokens - len(state.context)
        state.context += fresh_tokens(self.seed, state.seq, state.turn, fresh, self.vocab_size)
        last = state.turn == len(state.program.turns) - 1
        hints = ProgramHints(state.program.program_id, state.turn, last, turn.tool)
        params = SamplingParams(
            max_tokens=turn.output_tokens,
            ignore_eos=True,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": hints.to_params()},
        )
        rid = f"{state.program.program_id}#{state.turn}"
        state.sent_s, state.first_token_s, state.reply = self._now(), None, []
        if state.turn == 0:
            state.record.start_s = state.sent_s
        self._running[rid] = state
        prompt = TokensPrompt(prompt_token_ids=list(state.context))
        self.engine.add_request(rid, prompt, params, priority=state.seq)

    def _on_output(self, output: RequestOutput, on_done: Callable[[ProgramRecord], None]) -> None:
        state = self._running[output.request_id]
        now = self._now()
        tokens = output.outputs[0].token_ids
        if tokens and state.first_token_s is None:
            state.first_token_s = now
        state.reply += tokens
        if not output.finished:
            return
        del self._running[output.request_id]
        turn = state.program.turns[state.turn]
        if len(state.reply) != turn.output_tokens:
            raise RuntimeError(
                f"{output.request_id}: {len(state.reply)} tokens, {turn.output_tokens} asked"
            )
        state.record.turns.append(
            TurnRecord(
                prompt_tokens=len(state.context),
                cached_tokens=output.num_cached_tokens or 0,
                output_tokens=len(state.reply),
                latency_s=now - state.sent_s,
                ttft_s=(state.first_token_s or now) - state.sent_s,
                attempts=1,
            )
        )
        state.context += state.reply
        state.turn += 1
        if state.turn == len(state.program.turns):
            state.record.end_s = now
            state.context = []
            on_done(state.record)
            return
        heapq.heappush(self._due, (now + turn.tool_duration_s, state.seq))
