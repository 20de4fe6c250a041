"""Drive vLLM's real ``Scheduler`` and ``BlockPool`` without a model.

The engine core's loop is ``schedule()`` then ``update_from_output()``; here the model's
forward pass is replaced by a caller-supplied token per scheduled request (docs/architecture.md,
'Scheduler without a model'). Everything else, including the KV connector, is vLLM's own
code, so the scheduling and memory decisions are the ones a real deployment would make.

With ``async_scheduling`` the driver runs vLLM's ``AsyncScheduler`` the way the engine
core's batch queue does on CUDA (docs/architecture.md, 'Async scheduling'): step k is
scheduled while step
k-1 is in flight, and k-1's output is processed after. A finished request is then seen
one step later, and with a KV connector its blocks wait behind vLLM's deferred-free fence
for the step in flight. The CPU platform switches async scheduling off; the driver
switches it back on after the config is built, since no model runs here.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import KVTransferConfig, VllmConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import (
    get_kv_cache_config_from_groups,
    get_kv_cache_groups,
    get_request_block_hasher,
    init_none_hash,
)
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutputs
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from continuum_tiered.core.model_shapes import attention_dims, sliding_window_layout
from continuum_tiered.vllm.plugin import register


@dataclass(frozen=True)
class DriverConfig:
    model_dir: Path
    # The KV pool in blocks of the full layout (every layer's KV of ``block_size`` tokens):
    # its bytes are what vLLM's KV cache groups share (``SchedulerDriver.kv_cache_config``).
    num_blocks: int
    block_size: int = 32
    max_model_len: int = 8192
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    scheduling_policy: str = "fcfs"  # "priority" for program-level FCFS
    kv_transfer_config: dict[str, Any] | None = None
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    async_scheduling: bool = False
    # The scheduler's per-step statistics (connector metrics among them); a replay that
    # reads none saves their cost.
    log_stats: bool = True


def build_vllm_config(cfg: DriverConfig) -> VllmConfig:
    register()
    kv_transfer = KVTransferConfig(**cfg.kv_transfer_config) if cfg.kv_transfer_config else None
    args = EngineArgs(
        model=str(cfg.model_dir),
        skip_tokenizer_init=True,
        load_format="dummy",
        block_size=cfg.block_size,
        max_model_len=cfg.max_model_len,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_num_seqs=cfg.max_num_seqs,
        num_gpu_blocks_override=cfg.num_blocks,
        enable_prefix_caching=True,
        scheduling_policy=cfg.scheduling_policy,
        kv_transfer_config=kv_transfer,
        **cfg.engine_overrides,
    )
    return args.create_engine_config()


def layer_kv_specs(hf: dict, block_size: int) -> dict[str, KVCacheSpec]:
    """Each attention layer's KV cache spec, as the model runner would report them."""
    dims = attention_dims(hf)
    layout = sliding_window_layout(hf)
    specs: dict[str, KVCacheSpec] = {}
    for i in range(dims.num_layers):
        common = dict(
            block_size=block_size,
            num_kv_heads=dims.num_kv_heads,
            head_size=dims.head_dim,
            dtype=torch.bfloat16,
        )
        name = f"model.layers.{i}.self_attn.attn"
        if layout is not None and i in layout.sliding:
            specs[name] = SlidingWindowSpec(**common, sliding_window=layout.window)
        else:
            specs[name] = FullAttentionSpec(**common)
    return specs


def _kv_cache_config(vllm_config: VllmConfig, num_blocks: int, block_size: int) -> KVCacheConfig:
    """vLLM's own KV cache config for the model's layers, in a pool of ``num_blocks`` blocks
    of the full layout (every layer's KV of ``block_size`` tokens): that memory, in bytes, is
    what vLLM's grouping divides. With the hybrid KV cache manager a model mixing sliding-
    window and full-attention layers gets one group per layer type, each block holding a
    group's layers only, so the same memory holds more (smaller) blocks; without it, and
    for a model of one layer type, one group of ``num_blocks`` blocks."""
    hf = json.loads((Path(vllm_config.model_config.model) / "config.json").read_text())
    specs = layer_kv_specs(hf, block_size)
    full_layout_block = sum(
        FullAttentionSpec(
            block_size=block_size,
            num_kv_heads=spec.num_kv_heads,
            head_size=spec.head_size,
            dtype=spec.dtype,
        ).page_size_bytes
        for spec in specs.values()
    )
    cache = vllm_config.cache_config
    if cache.kv_cache_layout is None:  # the engine core resolves it from the backends:
        cache.kv_cache_layout = "NHD"  # FlashAttention's, on the GPU modelled
    groups = get_kv_cache_groups(vllm_config, specs)
    override, cache.num_gpu_blocks_override = cache.num_gpu_blocks_override, None
    try:  # the pool is sized by memory here, not by the override build_vllm_config sets
        return get_kv_cache_config_from_groups(
            vllm_config, groups, available_memory=num_blocks * full_layout_block
        )
    finally:
        cache.num_gpu_blocks_override = override


class SchedulerDriver:
    """A vLLM scheduler with a fake forward pass. Not thread-safe, like the real one."""

    def __init__(self, cfg: DriverConfig, vllm_config: VllmConfig | None = None):
        """``vllm_config`` reuses one built by ``build_vllm_config(cfg)`` (it takes seconds)."""
        self.cfg = cfg
        self.vllm_config = vllm_config or build_vllm_config(cfg)
        self.vllm_config.scheduler_config.async_scheduling = cfg.async_scheduling
        # ``cfg.num_blocks`` of the full layout, in the groups vLLM makes of the layers.
        self.kv_cache_config = _kv_cache_config(self.vllm_config, cfg.num_blocks, cfg.block_size)
        # The engine core sets this after profiling memory; here the caller chooses it.
        self.vllm_config.cache_config.num_gpu_blocks = self.kv_cache_config.num_blocks
        scheduler_cls = AsyncScheduler if cfg.async_scheduling else Scheduler
        self.depth = self.vllm_config.max_concurrent_batches  # steps in flight at most
        self._in_flight: deque[ScheduledStep] = deque()
        self.scheduler = scheduler_cls(
            vllm_config=self.vllm_config,
            kv_cache_config=self.kv_cache_config,
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=cfg.block_size,
            hash_block_size=cfg.block_size,
            log_stats=cfg.log_stats,
        )
        hash_fn = get_hash_fn_by_name(self.vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        self._block_hasher = get_request_block_hasher(cfg.block_size, hash_fn)

    @property
    def block_pool(self) -> Any:
        return self.scheduler.kv_cache_manager.block_pool

    @property
    def connector(self) -> Any:
        return self.scheduler.connector

    def blocks_held_by_requests(self) -> dict[str, list[Any]]:
        """The pool blocks each request holds (all KV cache groups), by request id: one
        reference each on ``ref_cnt``. Requests holding none are left out."""
        held: dict[str, list[Any]] = {}
        for manager in self.scheduler.kv_cache_manager.coordinator.single_type_managers:
            for request_id, blocks in manager.req_to_blocks.items():
                if blocks:
                    held.setdefault(request_id, []).extend(blocks)
        return held

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        arrival_time: float,
        priority: int = 0,
        kv_transfer_params: dict[str, Any] | None = None,
        prefix_block_hashes: Sequence[Any] = (),
        stop_token_id: int | None = None,
    ) -> Request:
        """``prefix_block_hashes``: hashes already known for the prompt's first blocks
        (a previous turn of the same program), so only the new blocks are hashed.
        ``stop_token_id``: the request also ends when it samples this token, which the
        scheduler cannot see coming (as a model's end of turn), unlike ``max_tokens``."""
        params = SamplingParams(
            max_tokens=max_tokens,
            ignore_eos=True,
            temperature=0.0,
            stop_token_ids=None if stop_token_id is None else [stop_token_id],
        )
        if kv_transfer_params is not None:
            params.extra_args = {"kv_transfer_params": kv_transfer_params}
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=params,
            pooling_params=None,
            arrival_time=arrival_time,
            priority=priority,
            block_hasher=self._hasher_with_prefix(prefix_block_hashes),
        )
        self.scheduler.add_request(request)
        return request

    def _hasher_with_prefix(self, known: Sequence[Any]) -> Callable[[Request], list[Any]]:
        if not known:
            return self._block_hasher
        base = self._block_hasher

        def hasher(request: Request) -> list[Any]:
            if not request.block_hashes:  # first call, from Request.__init__
                request.block_hashes.extend(known)
            return base(request)

        return hasher

    def schedule(self) -> ScheduledStep:
        return self.scheduled(self.scheduler.schedule())

    def scheduled(self, out: SchedulerOutput) -> ScheduledStep:
        """``out``, just returned by ``schedule()``, with the requests it samples a token
        for (a decode or a last prefill chunk) noted now: a later step may change that
        before this one's output is processed."""
        requests = self.scheduler.requests
        sampled = [rid for rid in out.num_scheduled_tokens if not requests[rid].is_prefill_chunk]
        return ScheduledStep(out, sampled)

    def runner_output(
        self, step: ScheduledStep, next_token: Callable[[Request], int]
    ) -> ModelRunnerOutput:
        """What the model would return for ``step``: one token per sampled request (none
        for one that finished since it was scheduled: vLLM drops that token anyway)."""
        req_ids = list(step.output.num_scheduled_tokens)
        requests = self.scheduler.requests
        tokens = {rid: [next_token(requests[rid])] for rid in step.sampled if rid in requests}
        return ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
            sampled_token_ids=[tokens.get(rid, []) for rid in req_ids],
        )

    def step(self, next_token: Callable[[Request], int] = lambda _r: 7) -> StepResult:
        """One engine step: schedule one, then feed back the fake model's tokens for the
        oldest in flight (the one just scheduled, without async scheduling). With nothing
        left to schedule, only the oldest in flight is processed."""
        if not self.scheduler.has_requests() and self._in_flight:
            step, done = None, self.oldest_in_flight()
        else:
            step = self.schedule()
            done = self.advance(step)
        out = None if step is None else step.output
        if done is None:
            return StepResult(out, {})
        runner = self.runner_output(done, next_token)
        return StepResult(out, self.scheduler.update_from_output(done.output, runner))

    def advance(self, step: ScheduledStep) -> ScheduledStep | None:
        """Queue ``step``; the step whose output is due now, if any: with async scheduling
        the engine core does not wait for a step while the queue has room and there is
        work (``EngineCore.step_with_batch_queue``)."""
        self._in_flight.append(step)
        executed = step.output.total_num_scheduled_tokens > 0
        if len(self._in_flight) < self.depth and (executed or self.scheduler.has_requests()):
            return None
        return self._in_flight.popleft()

    def oldest_in_flight(self) -> ScheduledStep:
        """The step the engine core waits for when it has nothing left to schedule."""
        return self._in_flight.popleft()

    @property
    def steps_in_flight(self) -> int:
        return len(self._in_flight)


@dataclass
class ScheduledStep:
    output: SchedulerOutput
    sampled: list[str]


@dataclass
class StepResult:
    scheduler_output: SchedulerOutput | None  # None: nothing was scheduled (async drain)
    engine_outputs: dict[int, EngineCoreOutputs]

    def prefix_hit_tokens(self, request_id: str) -> int | None:
        """Tokens found cached when ``request_id`` was admitted in this step, else None."""
        if self.scheduler_output is None:
            return None
        for new in self.scheduler_output.scheduled_new_reqs:
            if new.req_id == request_id:
                return new.num_computed_tokens
        return None

    @property
    def finished_request_ids(self) -> list[str]:
        return [
            o.request_id
            for outs in self.engine_outputs.values()
            for o in outs.outputs
            if o.finish_reason is not None
        ]
