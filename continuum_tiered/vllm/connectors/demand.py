"""How many KV blocks vLLM's scheduler is about to ask the pool for, so pins give way first.

Pins are invisible to vLLM: a waiting request that does not fit stops admission, and a
running request that cannot grow gets another one preempted. The connector therefore
frees pins *before* vLLM allocates, and needs vLLM's own arithmetic to know how many:

- admission (``KVCacheManager.allocate_slots``): the blocks for the request's first chunk
  beyond its local prefix hit, plus every hit block that sits in the free queue (the
  allocation takes it out), plus the watermark vLLM keeps back for waiting requests;
- the running batch's next step: each scheduled request's blocks for the tokens it will
  compute next (one decode token, or its next prefill chunk), plus lookahead slots.

Both are upper bounds where vLLM's own number depends on the step's remaining token
budget, which a connector cannot see. Under the hybrid KV cache manager every KV cache
group allocates its own blocks from the one pool, and a sliding-window group's admission
is capped by its window, which no per-group product reproduces: admission then asks
vLLM's own coordinator (the count its allocation checks), and the next step counts every
group as a full-attention one (an upper bound: pins give way a little early, never too
late). Async KV loads (which vLLM admits against a further reservation) are not counted:
our connectors load synchronously.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Admission:
    """What admitting one waiting request takes from the pool this step."""

    new_blocks: int  # blocks to allocate beyond the hit, watermark included
    hit_blocks: list[Any]  # the local prefix hit the allocation will adopt

    @property
    def keep(self) -> frozenset[int]:
        """Hit blocks: freeing one of them frees nothing, the allocation takes it back."""
        return frozenset(id(b) for b in self.hit_blocks)

    def shortfall(self, free_blocks: int) -> int:
        """Blocks still missing; a hit block in the free queue counts against the free."""
        evictable_hits = sum(1 for b in self.hit_blocks if b.ref_cnt == 0)
        return self.new_blocks + evictable_hits - free_blocks


class BlockDemand:
    def __init__(self, vllm_config: VllmConfig, block_size: int, num_groups: int = 1) -> None:
        sched = vllm_config.scheduler_config
        self.block_size = block_size
        self.num_groups = num_groups  # KV cache groups, each allocating from the pool
        self.max_model_len = vllm_config.model_config.max_model_len
        self.lookahead = vllm_config.num_lookahead_tokens
        self.max_chunk = sched.max_num_batched_tokens
        # Without chunked prefill (or when vLLM reserves the whole prompt up front), the
        # first allocation covers the whole prompt.
        self.whole_prompt = not sched.enable_chunked_prefill or bool(
            getattr(sched, "scheduler_reserve_full_isl", False)
        )
        self.manager: KVCacheManager | None = None

    @property
    def watermark_blocks(self) -> int:
        return getattr(self.manager, "watermark_blocks", 0) if self.manager else 0

    def admission_upper_bound(self, request: Request) -> int:
        """Blocks admitting ``request`` can take at most, whatever its prefix hit."""
        if self.num_groups > 1 and self.manager is not None:
            no_hit = self.manager.empty_kv_cache_blocks.blocks
            return self._hybrid_new_blocks(request, no_hit, 0) + self.watermark_blocks
        return self._blocks_through(request, 0) + self.watermark_blocks

    def admission(self, request: Request, local_hit_tokens: int) -> Admission:
        groups, hit = self._local_hit(request, local_hit_tokens)
        computed = len(groups[0]) * self.block_size if groups else 0
        if self.num_groups > 1 and self.manager is not None:
            new = self._hybrid_new_blocks(request, groups, computed)
        else:
            new = self._blocks_through(request, computed) - len(hit)
        return Admission(new + self.watermark_blocks, hit)

    def _hybrid_new_blocks(
        self, request: Request, hit: Sequence[Sequence[Any]], computed: int
    ) -> int:
        """New blocks of every KV cache group for the request's first allocation, as
        ``KVCacheManager.allocate_slots`` counts them (sliding windows capped)."""
        assert self.manager is not None
        if self.whole_prompt:
            end = min(request.num_tokens, self.max_model_len)
        else:
            chunk = min(request.num_tokens - computed, self.max_chunk)
            end = min(computed + chunk + self.lookahead, self.max_model_len)
        return self.manager.coordinator.get_num_blocks_to_allocate(
            request_id=request.request_id,
            num_tokens=end,
            new_computed_blocks=tuple(hit),
            num_encoder_tokens=0,
            total_computed_tokens=computed,
            num_local_computed_tokens=computed,
            num_tokens_main_model=end,
            apply_admission_cap=True,
            prefill_end=max(request.num_prompt_tokens, request.num_tokens - 1),
        )

    def next_step_upper_bound(self, num_requests: int) -> int:
        """Blocks a step of ``num_requests`` running requests can take at most: a block
        boundary each (plus lookahead), and a token budget's worth of prefill chunks."""
        per_request = 1 + _cdiv(self.lookahead, self.block_size)
        per_group = num_requests * per_request + _cdiv(self.max_chunk, self.block_size)
        return self.num_groups * per_group

    def next_step_blocks(self, request: Request, scheduled_tokens: int) -> int:
        """New blocks ``request`` needs in the step after the one that schedules
        ``scheduled_tokens`` of it (called before vLLM advances its computed tokens)."""
        computed = request.num_computed_tokens + scheduled_tokens
        if computed >= request.num_tokens:  # decoding next
            if request.num_output_tokens + 1 >= request.max_tokens:
                return 0  # this step's token is its last
            upcoming = 1
        else:
            upcoming = min(request.num_tokens - computed, self.max_chunk)
        held = _cdiv(min(computed + self.lookahead, self.max_model_len), self.block_size)
        end = min(computed + upcoming + self.lookahead, self.max_model_len)
        return self.num_groups * max(0, _cdiv(end, self.block_size) - held)

    def _blocks_through(self, request: Request, computed: int) -> int:
        """Blocks covering the prompt up to the end of its first chunk after ``computed``."""
        remaining = request.num_tokens - computed
        chunk = remaining if self.whole_prompt else min(remaining, self.max_chunk)
        end = min(computed + chunk + self.lookahead, self.max_model_len)
        return _cdiv(end, self.block_size)

    def _local_hit(
        self, request: Request, hit_tokens: int
    ) -> tuple[Sequence[Sequence[Any]], list[Any]]:
        """The local prefix hit vLLM just found, per KV cache group, and its blocks but the
        null block (a sliding-window group's placeholder before its window). A pure
        lookup: calling ``get_computed_blocks`` again would count the query twice in its
        stats."""
        if self.manager is None or hit_tokens <= 0:
            empty = self.manager.empty_kv_cache_blocks.blocks if self.manager else ()
            return empty, []
        groups, _, *_ = self.manager.coordinator.find_longest_cache_hit(
            request.block_hashes, hit_tokens
        )
        return groups, [b for group in groups for b in group if not b.is_null]


class DeferredFrees:
    """Blocks vLLM puts back in the free queue after the step in flight.

    With async scheduling (or pipeline parallelism) and a KV consumer connector, a request
    that finishes while a later step still has it scheduled has its blocks held behind a
    fence until that step is processed (docs/architecture.md, 'Async scheduling'): the next
    admission sees
    fewer free blocks than the sync scheduler would, though they come back before the one
    after. Counting them, a pin is not released for room that returns a step later; the
    request waits that step instead. Blocks of requests that finished since the last step
    was scheduled are noted; those left with the fence's reference only (``ref_cnt`` 1:
    not pinned, not shared) are counted. A noted block freed at once and already handed
    to another request counts too: the admission then waits one step, never longer, since
    the notes are cleared as each step is scheduled.
    """

    def __init__(self, vllm_config: VllmConfig) -> None:
        kv = vllm_config.kv_transfer_config
        self.enabled = bool(
            vllm_config.max_concurrent_batches > 1 and kv is not None and kv.is_kv_consumer
        )
        self._block_ids: list[int] = []

    def request_finished(self, block_ids: list[int]) -> None:
        if self.enabled:
            self._block_ids.extend(block_ids)

    def step_scheduled(self) -> None:
        self._block_ids.clear()

    def returning(self, blocks: list[Any]) -> int:
        """How many noted blocks of the pool ``blocks`` (by id) come back to the free queue."""
        return sum(1 for i in self._block_ids if blocks[i].ref_cnt == 1)
