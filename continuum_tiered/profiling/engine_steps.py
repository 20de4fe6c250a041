"""Step times of the serving engine itself: vLLM with the model (random weights) on the device.

The model-only curves of ``compute`` time the forward pass alone. A served request also
waits for what vLLM does around it every step: scheduling, input preparation, its own
attention kernels, sampling, the hop between the engine-core and worker processes, and
output processing; on a CPU these share the cores with the forward pass. This module
times whole engine steps with vLLM's ``LLMEngine`` (the frontend, engine-core and worker
processes a server runs, without HTTP) and fits them with the same curves, so that a
replay in virtual time waits as long as a served request does.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from continuum_tiered.profiling.compute import DecodeResult, PrefillResult, fit_decode, fit_prefill
from continuum_tiered.profiling.measure import BLOCK_TOKENS

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DECODE_WINDOW = 8  # decode steps averaged per sample
FIRST_TOKEN_ID = 3  # below: special tokens of the tiny model's tokenizer


@dataclass(frozen=True)
class StepTimings:
    prefill: PrefillResult
    decode: DecodeResult


@dataclass(frozen=True)
class StepTimingSetup:
    model_dir: Path
    device: str
    dtype: str
    vocab_size: int
    max_position_embeddings: int


def measure_engine(
    setup: StepTimingSetup,
    lengths: list[int],
    grid: list[tuple[int, int]],
    prefill_repeats: int,
    decode_repeats: int,
) -> StepTimings:
    """Prefill of each length in ``lengths`` and decode steps at each (batch, context)."""
    # The first token, one settling step, the timed windows, and one step to spare.
    decode_tokens = 3 + decode_repeats * DECODE_WINDOW
    max_len = min(
        setup.max_position_embeddings, max(lengths + [c for _, c in grid]) + decode_tokens
    )
    # vLLM wants room for the output within max_model_len. One block more pins the fixed
    # cost of a step, which long prefills leave to the fit's noise: a replay's prefills
    # are mostly short chunks after a cached prefix.
    block = BLOCK_TOKENS[setup.device]
    lengths = sorted({block, *(min(n, max_len - 1) for n in lengths)})
    grid = [(b, min(c, max_len - decode_tokens)) for b, c in grid]
    blocks = max(b * math.ceil((c + decode_tokens) / block) for b, c in grid)
    blocks = max(blocks, math.ceil(max_len / block)) + 1  # block 0 is vLLM's null block
    with _engine(setup, max_len, blocks, max(lengths), max(b for b, _ in grid)) as llm:
        engine = _Driver(llm, setup.vocab_size)
        engine.run_to_end([engine.prompt(min(lengths))], max_tokens=2)  # warm-up
        seconds = [
            statistics.median(engine.timed_prefill(n) for _ in range(prefill_repeats))
            for n in tqdm(lengths, desc="engine prefill", unit="length")
        ]
        points = [
            (batch, context, engine.timed_decode(batch, context, decode_repeats, decode_tokens))
            for batch, context in tqdm(grid, desc="engine decode", unit="point")
        ]
    coeffs, method = fit_prefill(lengths, seconds)
    prefill = PrefillResult(tuple(lengths), tuple(seconds), coeffs, method)
    return StepTimings(prefill, DecodeResult(tuple(points), fit_decode(points)))


@contextmanager
def _engine(
    setup: StepTimingSetup, max_len: int, blocks: int, max_prefill: int, max_batch: int
) -> Iterator[object]:
    """vLLM configured as ``continuum-tiered serve`` runs it, sized for the measurements."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(setup.model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        dtype=DTYPE_NAMES[setup.dtype],
        block_size=BLOCK_TOKENS[setup.device],
        num_gpu_blocks_override=blocks,
        max_model_len=max_len,
        max_num_batched_tokens=max(max_prefill, max_batch),  # each prefill in one step
        max_num_seqs=max_batch,
        enable_prefix_caching=True,
        # The CPU build needs eager mode; on a GPU the engine runs as served (CUDA graphs).
        enforce_eager=setup.device == "cpu",
        # On the CPU build: the share of host memory set aside for KV (the pool is fixed).
        **({"gpu_memory_utilization": 0.15} if setup.device == "cpu" else {}),
    )
    engine = LLMEngine.from_engine_args(args)
    try:
        yield engine
    finally:
        engine.engine_core.shutdown()


class _Driver:
    """Submits fresh random prompts (no prefix of one is cached from another) and times steps."""

    def __init__(self, llm, vocab_size: int):
        self.llm = llm
        self._rng = random.Random(0)
        self._vocab_size = vocab_size
        self._ids = itertools.count()

    def prompt(self, n: int) -> list[int]:
        return [self._rng.randrange(FIRST_TOKEN_ID, self._vocab_size) for _ in range(n)]

    def add(self, prompts: list[list[int]], max_tokens: int) -> list[str]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        ids = [f"profile-{next(self._ids)}" for _ in prompts]
        for rid, prompt in zip(ids, prompts, strict=True):
            self.llm.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        return ids

    def run_to_end(self, prompts: list[list[int]], max_tokens: int) -> None:
        self.add(prompts, max_tokens)
        self.drain()

    def drain(self) -> None:
        while self.llm.has_unfinished_requests():
            self.llm.step()

    def timed_prefill(self, n: int) -> float:
        """From submitting a prompt to its only token: one prefill step and its admission."""
        prompt = self.prompt(n)
        start = time.perf_counter()
        self.run_to_end([prompt], max_tokens=1)
        return time.perf_counter() - start

    def timed_decode(self, batch: int, context: int, repeats: int, max_tokens: int) -> float:
        """Median of ``repeats`` windows of decode steps, once every sequence has its first
        token.

        The engine core steps on its own and queues each step's outputs; in steady state
        the frontend takes one step's outputs per ``step()`` call, so a window of calls
        lasts as many engine steps.
        """
        ids = self.add([self.prompt(context) for _ in range(batch)], max_tokens)
        started: set[str] = set()
        while len(started) < batch:
            started |= {o.request_id for o in self.llm.step() if o.outputs[0].token_ids}
        self.llm.step()  # settle: the first decode step may still carry admission work
        windows = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(DECODE_WINDOW):
                self.llm.step()
            windows.append((time.perf_counter() - start) / DECODE_WINDOW)
        self.llm.abort_request(ids)
        self.drain()
        return statistics.median(windows)
