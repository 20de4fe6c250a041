"""``ContinuumConnector``: TTL pins across tool calls, as a scheduler-side vLLM KV connector.

It moves no KV. It only holds extra references on a finished turn's blocks (see
``continuum_tiered.core.pins``) so the program's next turn gets a prefix hit, and gives them
back when the next turn is allocated, when the TTL expires, or when memory is needed:

- ``request_finished``: ask the retention policy for a TTL and pin the turn's full blocks.
  Under vLLM's hybrid KV cache manager (a model with sliding-window layers: one KV cache
  group per layer type, ``SupportsHMA``), ``request_finished_all_groups`` pins each group's
  blocks: the full-attention groups' whole prefix, the sliding-window groups' blocks still
  in their window (vLLM has already freed the ones before it, which no later turn reads).
  The returning turn's prefix hit needs both: vLLM accepts a hit only where every group has
  its blocks.
- ``get_num_new_matched_tokens``: before a waiting request is allocated, release pins
  until its first chunk fits (``connectors.demand`` has vLLM's arithmetic), so a pin never
  blocks admission: the requester's own pin too, where its next prompt diverged from it.
  Nothing is released when even every pin would not make room. Under async scheduling,
  blocks behind vLLM's deferred-free fence count as free: they are back next step.
- ``build_connector_meta`` (end of each step): expire pins past their deadline, and
  release pins until the running batch's next step fits, so vLLM never has to preempt a
  running request while a pin could give way.
- ``has_pending_block_frees``: the fallback when that estimate fell short and a running
  request cannot grow: release pins, and hold new admissions for the rest of the step so
  the freed blocks go to the running requests in the next one, not to newcomers.
- ``update_state_after_alloc``: the next turn holds its own references; drop the pin.
- ``bind_tiers``: the clock and the tiers below the GPU (``connectors.tier_link``), from
  whatever knows them; wall-clock time and no lower tier until then.
- a prefix-cache reset (``reset_prefix_cache``, sleep, ``pause_scheduler(clear_cache)``)
  drops every pin first: vLLM refuses to reset while any block is held and gives
  connectors no hook before it, so ``bind_gpu_block_pool`` wraps the pool's reset.

Every hook runs on the scheduler thread; the worker-side half is a no-op.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.logger import init_logger
from vllm.v1.request import RequestStatus

from continuum_tiered.core.hints import HintError, ProgramHints, request_hints
from continuum_tiered.core.pins import Pin, PinTable, ReleaseReason
from continuum_tiered.core.programs import ProgramTable
from continuum_tiered.policies.base import TurnEnd
from continuum_tiered.vllm import compat
from continuum_tiered.vllm.connectors.config import ConnectorOptions
from continuum_tiered.vllm.connectors.demand import BlockDemand, DeferredFrees
from continuum_tiered.vllm.connectors.reply_tools import ReplyToolParser
from continuum_tiered.vllm.connectors.scheduler_only import SchedulerOnlyConnector
from continuum_tiered.vllm.connectors.stats import ContinuumPromMetrics, ContinuumStats, ToolLabels
from continuum_tiered.vllm.connectors.tier_link import NoTiers, TierLink

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.request import Request

logger = init_logger(__name__)

# Turns that ended normally; aborted, errored or ignored requests are never pinned.
_PINNABLE = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED})
_WALL_CLOCK_NO_TIERS = NoTiers()


def _lookup_group(groups: Sequence[KVCacheGroupSpec]) -> int:
    """The KV cache group whose pinned blocks measure a returning turn's prefix hit: the
    first full-attention one (its blocks cover the whole prefix); group 0 where all layers
    slide."""
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    for i, group in enumerate(groups):
        if not isinstance(group.kv_cache_spec, SlidingWindowSpec):
            return i
    return 0


def _shared_blocks(pinned: list[Any], held: Sequence[Any]) -> int:
    """How many of a pin's blocks a request holds. A pinned block can only be held at its
    own position: its hash chains every block before it, and a pinned block is never in
    the free queue, so never newly allocated at another position."""
    return sum(map(operator.is_, pinned, held))


class ContinuumConnector(SchedulerOnlyConnector, SupportsHMA):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        self._link: TierLink | None = None
        if role != KVConnectorRole.SCHEDULER:
            return
        compat.check_vllm()
        self.options = ConnectorOptions.from_vllm_config(vllm_config)
        self.policy = self.options.make_policy()
        self.block_size = vllm_config.cache_config.block_size
        self.programs = ProgramTable()
        self._pins: PinTable | None = None
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        self._demand = BlockDemand(vllm_config, self.block_size, max(1, len(groups)))
        self._lookup_group = _lookup_group(groups)
        self._deferred = DeferredFrees(vllm_config)
        self._tool_parser = ReplyToolParser(vllm_config.model_config)
        self._requests: dict[str, Request] = {}  # every live request, hinted or not
        self._hints: dict[str, ProgramHints] = {}  # live requests that carry hints
        self._unallocated: dict[str, str] = {}  # request id -> program id, not yet admitted
        self._waiting_per_program: dict[str, int] = {}
        self._admissions_held = False  # a running request starved this step
        self._tool_labels = ToolLabels()
        self._tool_ttls: dict[str, float] = {}
        self._counters = dict.fromkeys(
            ("pinned_prefix_hit_tokens", "hints_rejected", "pin_handovers"), 0
        )
        self._reported: dict[str, int] = {}
        self._reported_state: tuple[int, int, bool] = (0, 0, False)
        logger.info(
            "ContinuumConnector: policy=%s, profile=%s", self.policy.name, self.options.profile
        )

    # ------------------------------------------------------------------ binding

    def bind_tiers(self, link: TierLink) -> None:
        """Hand the connector its clock and the tiers below the GPU: the one way they reach
        it, once, before its first request."""
        if self._link is not None:
            raise RuntimeError("ContinuumConnector is bound to its tiers already")
        self._link = link

    @property
    def tiers(self) -> TierLink:
        return self._link if self._link is not None else _WALL_CLOCK_NO_TIERS

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.role == KVConnectorRole.SCHEDULER:
            self._demand.manager = kv_cache_manager

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        self._block_pool = gpu_block_pool
        self._pins = PinTable(
            gpu_block_pool, lambda pin: self.policy.pressure_key(pin, self.tiers.now())
        )
        reset = gpu_block_pool.reset_prefix_cache

        def reset_without_pins() -> bool:
            # Only when the pins are all that stands in the way: a reset that fails
            # anyway (running requests hold blocks) must not cost every pin.
            if len(self.pins) and self.pins.holds_every_used_block():
                self._release_all(ReleaseReason.CACHE_RESET)
            return reset()

        gpu_block_pool.reset_prefix_cache = reset_without_pins  # type: ignore[method-assign]

    @property
    def pins(self) -> PinTable:
        if self._pins is None:
            raise RuntimeError("ContinuumConnector used before the block pool was bound")
        return self._pins

    # ------------------------------------------------------------- request flow

    def on_new_request(self, request: Request) -> None:
        self._requests[request.request_id] = request
        hints = self._hints_of(request)
        if hints is None:
            return
        now = request.arrival_time
        program = self.programs.get(hints.program_id)
        if program is not None and program.last_finish_s is not None:
            self.policy.observe_tool_duration(program.last_tool, now - program.last_finish_s)
        self.programs.arrive(hints.program_id, now)
        self._hints[request.request_id] = hints
        self._unallocated[request.request_id] = hints.program_id
        self._count_waiting(hints.program_id, +1)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        """Make room for ``request`` (``num_computed_tokens``: its local prefix hit)."""
        if self._admissions_held:
            return None, False  # vLLM skips it this step: the blocks are the running batch's
        pool = self._block_pool
        returning = self._deferred.returning(pool.blocks) if self._deferred.enabled else 0

        def free() -> int:
            return pool.get_num_free_blocks() + returning

        if free() >= self._demand.admission_upper_bound(request) or not len(self.pins):
            return 0, False
        self._expire()
        admission = self._demand.admission(request, num_computed_tokens)
        hints = self._hints.get(request.request_id)
        self.pins.release_for(
            lambda: admission.shortfall(free()),
            keep=admission.keep,
            first=hints.program_id if hints else None,
            all_or_nothing=True,
        )
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        program_id = self._unallocated.pop(request.request_id, None)
        if program_id is None:
            return
        self._count_waiting(program_id, -1)
        pin = self.pins.release(program_id, ReleaseReason.HANDED_OVER)
        hit_tokens = 0
        if pin is not None:
            held = blocks.blocks[self._lookup_group]
            hit_tokens = self.block_size * _shared_blocks(pin.lookup_blocks, held)
            self._counters["pinned_prefix_hit_tokens"] += hit_tokens
            self._counters["pin_handovers"] += 1
        self.programs.record_prompt(program_id, request.num_prompt_tokens, hit_tokens)
        if pin is None and self._hints[request.request_id].turn > 0:
            # A returning turn whose KV was not pinned: its wait is the eviction cost T_q.
            self.policy.observe_queue_delay(max(0.0, self.tiers.now() - request.arrival_time))

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished_all_groups(request, (block_ids,))

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._deferred.request_finished([i for group in block_ids for i in group])
        hints = self._hints.pop(request.request_id, None)
        if hints is None:
            return False, None
        if self._unallocated.pop(request.request_id, None) is not None:
            self._count_waiting(hints.program_id, -1)
        now = self.tiers.now()
        if request.status not in _PINNABLE:
            self.programs.request_dropped(hints.program_id)
            return False, None
        if hints.last_turn:
            self._end_program(hints.program_id)
            return False, None
        tool = hints.tool or self._tool_parser.tool_of(request)
        decision = self.policy.decide(
            TurnEnd(
                program_id=hints.program_id,
                tool=tool,
                context_tokens=request.num_tokens,
                last_turn=False,
                now_s=now,
                tier=self.tiers.tier_after_release(request),
                can_offload=self.tiers.can_offload,
            )
        )
        self._tool_ttls[self._tool_labels.label(tool)] = decision.ttl_s
        if decision.offload and self.tiers.can_offload:
            self.tiers.offload(request)
        groups = (
            [self._cached_blocks(ids, request.num_computed_tokens) for ids in block_ids]
            if decision.ttl_s > 0
            else []
        )
        pinned = bool(groups) and all(groups)  # a group with nothing cached: no prefix hit
        program = self.programs.turn_finished(
            hints.program_id, now, tool, request.num_tokens, pinned=pinned
        )
        if pinned:
            self.pins.pin(
                Pin(
                    program_id=hints.program_id,
                    program_seq=program.seq,
                    blocks=[block for group in groups for block in group],
                    lookup=groups[self._lookup_group] if len(groups) > 1 else None,
                    pinned_at_s=now,
                    deadline_s=now + decision.ttl_s,
                    tool=tool,
                    context_tokens=request.num_tokens,
                    benefit_s=decision.benefit_s,
                )
            )
        else:
            self.pins.release(hints.program_id, ReleaseReason.REPLACED)
        return False, None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._admissions_held = False
        self._deferred.step_scheduled()
        self._expire()
        if len(self.pins):
            self._make_room_for_next_step(scheduler_output.num_scheduled_tokens)
        return super().build_connector_meta(scheduler_output)

    def has_pending_block_frees(self) -> bool:
        """A running request cannot grow though the step's estimate said it would: free
        pins, and tell vLLM to stop scheduling running requests this step instead of
        preempting one (it reads True as "blocks are on their way")."""
        self._expire()
        released = self.pins.release_until_free(self.options.pressure_reserve_blocks)
        self._admissions_held |= bool(released)
        return bool(released)

    def shutdown(self) -> None:
        if self.role == KVConnectorRole.SCHEDULER and self._pins is not None:
            self._release_all(ReleaseReason.SHUTDOWN)

    # ------------------------------------------------------------------- stats

    def get_kv_connector_stats(self) -> ContinuumStats | None:
        """Called every engine step: returns None unless something changed."""
        if self.role != KVConnectorRole.SCHEDULER or self._pins is None:
            return None
        state = (self.pins.version, self._counters["hints_rejected"], bool(self._tool_ttls))
        if state == self._reported_state:
            return None
        self._reported_state = state
        totals = {
            **self._counters,
            "pins_created": self.pins.pins_created,
            "pin_expirations": self.pins.releases[ReleaseReason.EXPIRED],
            "pin_releases_pressure": self.pins.releases[ReleaseReason.PRESSURE],
        }
        deltas = {k: v - self._reported.get(k, 0) for k, v in totals.items()}
        self._reported = totals
        data: dict[str, Any] = {k: v for k, v in deltas.items() if v}
        data["active_pins"] = len(self.pins)
        data["pinned_blocks"] = self.pins.num_pinned_blocks
        if self._tool_ttls:
            data["tool_ttl_s"] = self._tool_ttls
            self._tool_ttls = {}
        return ContinuumStats(data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> ContinuumStats:
        return ContinuumStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> ContinuumPromMetrics:
        return ContinuumPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # --------------------------------------------------------------- internals

    def _hints_of(self, request: Request) -> ProgramHints | None:
        """Hints of a request (``request_hints``); malformed ones are logged and ignored,
        never raised."""
        try:
            return request_hints(request)
        except HintError as err:
            self._counters["hints_rejected"] += 1
            logger.warning("request %s: ignoring its hints: %s", request.request_id, err)
            return None

    def _expire(self) -> None:
        """Release pins past their deadline whose program has nothing waiting; run before
        any pressure release too, so an overdue pin never outlives a step."""
        for pin in self.pins.expire(self.tiers.now(), self._has_waiting_request):
            self.programs.mark_evicted(pin.program_id)

    def _release_all(self, reason: ReleaseReason) -> None:
        for pin in self.pins.release_all(reason):
            self.programs.mark_evicted(pin.program_id)

    def _make_room_for_next_step(self, num_scheduled_tokens: dict[str, int]) -> None:
        """Release pins until the requests scheduled in this step can all grow in the
        next one; each released pin is one preemption vLLM does not make."""
        free = self._block_pool.get_num_free_blocks
        if free() >= self._demand.next_step_upper_bound(len(num_scheduled_tokens)):
            return  # the common case, in O(1): no need to look at each request
        needed = sum(
            self._demand.next_step_blocks(request, tokens)
            for rid, tokens in num_scheduled_tokens.items()
            if (request := self._requests.get(rid)) is not None
        )
        if needed > free():
            self.pins.release_for(lambda: needed - free())

    def _count_waiting(self, program_id: str, delta: int) -> None:
        count = self._waiting_per_program.get(program_id, 0) + delta
        if count > 0:
            self._waiting_per_program[program_id] = count
        else:
            self._waiting_per_program.pop(program_id, None)

    def _has_waiting_request(self, program_id: str) -> bool:
        return self._waiting_per_program.get(program_id, 0) > 0

    def _cached_blocks(self, block_ids: list[int], num_computed_tokens: int) -> list[Any]:
        """One KV cache group's full, hashed blocks of the turn: past the null blocks a
        sliding-window group starts with (freed already, out of its window), up to the first
        block that is not hashed (a hole would make the rest unreachable by a prefix
        lookup). The null block is never pinned."""
        blocks = []
        for block_id in block_ids[: num_computed_tokens // self.block_size]:
            block = self._block_pool.blocks[block_id]
            if block.is_null and not blocks:
                continue
            if block.is_null or block.block_hash is None:
                break
            blocks.append(block)
        return blocks

    def _end_program(self, program_id: str) -> None:
        self.pins.release(program_id, ReleaseReason.PROGRAM_ENDED)
        program = self.programs.end(program_id)
        if program is not None:
            self.policy.observe_program_finished(program.turns_served + 1)
