"""The plugin on the two model layouts beside Llama, on vLLM's CPU build with random weights:

- a Gemma-3 text model (three sliding-window layers of a 64-token window, one full-attention
  layer): vLLM's hybrid KV cache manager stays on with ``ContinuumConnector`` (it supports
  it), so the pool holds one KV cache group per layer and a pin must hold every group's
  blocks, or the returning turn gets no prefix hit;
- a Mixtral (a mixture of experts): the same pin hand-over as on Llama.

Both run the default policy (``tiered``) with a cold-start TTL long enough for a test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import vllm.envs
from vllm import SamplingParams
from vllm.v1.engine.llm_engine import LLMEngine
from vllm.v1.kv_cache_interface import SlidingWindowSpec

from continuum_tiered.cli import main
from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.model_shapes import sliding_window_layout
from continuum_tiered.core.pins import ReleaseReason
from continuum_tiered.core.server_process import BLOCK_SIZE
from continuum_tiered.core.tiny_model import TINY_SLIDING_WINDOW, write_tiny_model
from continuum_tiered.lab.in_process_replay import (
    InProcessSetup,
    reset_prefix_cache,
    served_engine,
)

# Blocks of one layer each. vLLM starts only if one request of MAX_MODEL_LEN fits: 32 blocks
# of the full-attention layer, 11 of each sliding one (the window and a token budget).
KV_BLOCKS = 96
MAX_MODEL_LEN = 1024
POLICY_OPTIONS = {"cold_start_ttl_s": 60.0}


def _setup(tmp_path_factory: pytest.TempPathFactory, family: str) -> InProcessSetup:
    model = write_tiny_model(tmp_path_factory.mktemp(family), family)
    return InProcessSetup(
        model,
        KV_BLOCKS,
        max_num_batched_tokens=256,
        max_num_seqs=4,
        policy_options=POLICY_OPTIONS,
        max_model_len=MAX_MODEL_LEN,
    )


@contextmanager
def _in_process_engine(setup: InProcessSetup) -> Iterator[LLMEngine]:
    """The engine core in this process, so the tests can read its scheduler and pins."""
    with ExitStack() as stack:
        with pytest.MonkeyPatch.context() as patch:  # only while the engine starts
            patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            vllm.envs.disable_envs_cache()  # a started engine caches the environment it read
            engine = stack.enter_context(served_engine(setup))
        vllm.envs.disable_envs_cache()
        yield engine


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMEngine]:
    with _in_process_engine(_setup(tmp_path_factory, "gemma3")) as engine:
        yield engine


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLMEngine]:
    """In its own engine process: an engine core in this one set vLLM's parallel state up
    without an expert-parallel group, which a mixture of experts needs."""
    with served_engine(_setup(tmp_path_factory, "mixtral")) as engine:
        yield engine


def _scheduler(engine: LLMEngine):
    return engine.engine_core.engine_core.scheduler


def _run(engine: LLMEngine, request_id: str, prompt: list[int], hints: ProgramHints) -> list[int]:
    """One turn to completion; its output tokens."""
    return list(_finish(engine, request_id, prompt, hints).outputs[0].token_ids)


def _run_cached(engine: LLMEngine, request_id: str, prompt: list[int], hints: ProgramHints) -> int:
    """One turn to completion; its prompt tokens served from the prefix cache."""
    return _finish(engine, request_id, prompt, hints).num_cached_tokens


def _finish(engine: LLMEngine, request_id: str, prompt: list[int], hints: ProgramHints):
    params = SamplingParams(
        max_tokens=8, ignore_eos=True, extra_args={"kv_transfer_params": hints.to_params()}
    )
    engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    for _ in range(500):
        for output in engine.step():
            if output.finished and output.request_id == request_id:
                return output
    raise AssertionError(f"{request_id} did not finish in 500 steps")


def _tokens(start: int, count: int) -> list[int]:
    return [3 + (start + i) % 500 for i in range(count)]


def _all_blocks_free(engine: LLMEngine) -> None:
    """Every pin released and no block leaked: the pool is whole again."""
    reset_prefix_cache(engine)
    pool = _scheduler(engine).kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # less the null block


def test_the_hybrid_manager_stays_on_and_pins_hold_every_group(gemma: LLMEngine) -> None:
    scheduler = _scheduler(gemma)
    assert scheduler.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False
    groups = scheduler.kv_cache_config.kv_cache_groups
    sliding = [isinstance(g.kv_cache_spec, SlidingWindowSpec) for g in groups]
    assert sorted(sliding) == [False, True, True, True]
    connector = scheduler.connector

    prompt = _tokens(0, 200)
    reply = _run(gemma, "a0", prompt, ProgramHints("a", 0, tool="ls"))
    (pin,) = connector.pins
    full_blocks = (len(prompt) + len(reply) - 1) // BLOCK_SIZE  # the last token is not cached
    assert len(pin.lookup_blocks) == full_blocks
    window_blocks = -(-(TINY_SLIDING_WINDOW - 1) // BLOCK_SIZE) + 1
    sliding_pinned = pin.num_blocks - full_blocks
    assert 3 <= sliding_pinned <= 3 * window_blocks  # the window's blocks, not the prefix's
    assert not any(block.is_null for block in pin.blocks)

    before = dict(connector._counters)
    _run(gemma, "a1", prompt + reply + _tokens(300, 40), ProgramHints("a", 1, last_turn=True))
    assert connector._counters["pin_handovers"] == before["pin_handovers"] + 1
    hit = connector._counters["pinned_prefix_hit_tokens"] - before["pinned_prefix_hit_tokens"]
    assert hit == full_blocks * BLOCK_SIZE
    _all_blocks_free(gemma)


def test_a_pin_gives_way_to_a_request_that_needs_its_blocks(gemma: LLMEngine) -> None:
    """Program b's pin (34 blocks) and c's 1,000-token prompt (65 at its peak) overflow the
    pool of 95: the pin goes, c runs."""
    connector = _scheduler(gemma).connector
    _run(gemma, "b0", _tokens(100, 900), ProgramHints("b", 0, tool="pytest"))
    assert len(connector.pins) == 1
    before = connector.pins.releases[ReleaseReason.PRESSURE]
    _run(gemma, "c0", _tokens(250, 1000), ProgramHints("c", 0, last_turn=True))
    assert connector.pins.releases[ReleaseReason.PRESSURE] == before + 1
    assert len(connector.pins) == 0
    _all_blocks_free(gemma)


def test_serve_prints_what_the_hybrid_manager_saves(tmp_path: Path, capsys) -> None:
    """The tiny Gemma 3 at 1,000 tokens of 32-token blocks: with the manager, 32 blocks of
    the full layer and 3 of each sliding one (a 64-token window and the block it starts in);
    without it 32 of each of the four layers, 128 / 41 = 3.1x."""
    model = write_tiny_model(tmp_path / "gemma3", "gemma3")
    layout = sliding_window_layout(json.loads((model / "config.json").read_text()))
    assert layout is not None and (layout.sliding_layers, layout.window) == (3, 64)
    on, off = (
        layout.kv_bytes(1000, 1, BLOCK_SIZE, hybrid) // BLOCK_SIZE for hybrid in (True, False)
    )
    assert (on, off) == (32 + 3 * 3, 4 * 32)
    args = ["serve", str(model), "--max-model-len", "1000", "--block-size", "32", "--dry-run"]
    assert main([*args, "--tiers", "cpu=1GB"]) == 0
    assert "warning: hybrid KV cache manager: off" in capsys.readouterr().err
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "hybrid KV cache manager: on (3 of 4 layers" in out
    assert "--disable-hybrid-kv-cache-manager" not in out
    assert main(["serve", str(write_tiny_model(tmp_path / "llama", "llama")), "--dry-run"]) == 0
    assert "hybrid KV cache manager" not in capsys.readouterr().out


def test_a_mixture_of_experts_model_keeps_its_pinned_prefix(mixtral: LLMEngine) -> None:
    """Between two turns of program m, three 1,000-token requests take 96 blocks of the 86
    the pin leaves free: unpinned, m's cached blocks would be evicted; pinned, its next turn
    finds all of them."""
    prompt = _tokens(0, 300)
    reply = _run(mixtral, "m0", prompt, ProgramHints("m", 0, tool="grep"))
    for i in range(3):
        _run(mixtral, f"f{i}", _tokens(120 + 7 * i, 1000), ProgramHints(f"f{i}", 0, last_turn=True))
    cached = _run_cached(
        mixtral, "m1", prompt + reply + _tokens(400, 20), ProgramHints("m", 1, last_turn=True)
    )
    assert cached == (len(prompt) + len(reply) - 1) // BLOCK_SIZE * BLOCK_SIZE
    reset_prefix_cache(mixtral)  # raises while any block is still held: nothing leaked
