"""Pins: extra references on a finished turn's KV blocks, held for a time-to-live.

A pin is one reference per block, taken with ``BlockPool.touch`` and given back with
``BlockPool.free_blocks`` (docs/architecture.md, 'Pins'). While pinned, the blocks stay out of the
free queue and their hashes stay in the prefix-cache map, so the program's next turn gets
an ordinary prefix hit. This module holds the bookkeeping and nothing vLLM-specific: the
pool is anything with ``touch``, ``free_blocks`` and ``get_num_free_blocks`` whose blocks
carry a ``ref_cnt``, which keeps it testable without an engine. All calls must come from
the scheduler thread.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol


class BlockPoolLike(Protocol):
    def touch(self, blocks: Sequence[object]) -> None: ...

    def free_blocks(self, ordered_blocks: Sequence[object]) -> None: ...

    def get_num_free_blocks(self) -> int: ...

    @property
    def num_gpu_blocks(self) -> int: ...


class ReleaseReason(enum.Enum):
    HANDED_OVER = "handed_over"  # the program's next turn was allocated
    EXPIRED = "expired"  # deadline passed while the program had nothing waiting
    PRESSURE = "pressure"  # another request needed the memory
    REPLACED = "replaced"  # the program finished another turn and pinned that one
    PROGRAM_ENDED = "program_ended"
    CACHE_RESET = "cache_reset"  # the prefix cache was reset (weights changed, sleep, ...)
    SHUTDOWN = "shutdown"


@dataclass
class Pin:
    program_id: str
    program_seq: int
    blocks: list[object]
    pinned_at_s: float
    deadline_s: float
    tool: str | None
    context_tokens: int
    benefit_s: float = 0.0  # what the policy expects the pin to save if the program returns
    # The blocks a returning turn's prefix lookup walks, in position order: all of
    # ``blocks`` (None) but under the hybrid KV cache manager, where ``blocks`` spans every
    # KV cache group and this is the full-attention group's share.
    lookup: list[object] | None = None

    @property
    def lookup_blocks(self) -> list[object]:
        return self.blocks if self.lookup is None else self.lookup

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


PressureOrder = Callable[[Pin], tuple[float, ...]]


def latest_program_first(pin: Pin) -> tuple[float, ...]:
    """Continuum's order: the pin of the most recently arrived program goes first."""
    return (-pin.program_seq,)


class PinTable:
    """At most one pin per program, each a reference on its blocks in the pool."""

    def __init__(self, pool: BlockPoolLike, pressure_order: PressureOrder = latest_program_first):
        self._pool = pool
        self._pins: dict[str, Pin] = {}
        # Deadline heap, so a step's expiry check costs O(log n) instead of a scan of all
        # pins. Entries of released pins stay until popped; ``_compact`` bounds them.
        self._deadlines: list[tuple[float, int, Pin]] = []
        self._tiebreak = itertools.count()
        self._overdue: dict[str, Pin] = {}  # past the deadline, program still waiting
        self._pressure_order = pressure_order
        self.releases: Counter[ReleaseReason] = Counter()
        self.pins_created = 0
        self.num_pinned_blocks = 0
        self.version = 0  # bumped on every change, so readers can skip unchanged state

    def __len__(self) -> int:
        return len(self._pins)

    def __iter__(self) -> Iterator[Pin]:
        return iter(self._pins.values())

    def get(self, program_id: str) -> Pin | None:
        return self._pins.get(program_id)

    def pin(self, new: Pin) -> None:
        """Take a reference on ``new.blocks``, replacing the program's previous pin.

        The new references are taken before the old ones are dropped, so blocks shared by
        both turns never reach a reference count of zero in between.
        """
        if not new.blocks:
            return
        self._pool.touch(new.blocks)
        self.release(new.program_id, ReleaseReason.REPLACED)
        self._pins[new.program_id] = new
        self.pins_created += 1
        self.num_pinned_blocks += new.num_blocks
        self.version += 1
        heapq.heappush(self._deadlines, (new.deadline_s, next(self._tiebreak), new))
        if len(self._deadlines) > 2 * len(self._pins) + 64:
            self._compact()

    def _compact(self) -> None:
        self._deadlines = [e for e in self._deadlines if self._pins.get(e[2].program_id) is e[2]]
        heapq.heapify(self._deadlines)

    def release(self, program_id: str, reason: ReleaseReason) -> Pin | None:
        pin = self._pins.pop(program_id, None)
        if pin is None:
            return None
        # Free tail-first: the free queue evicts the blocks it receives first, and the
        # deepest blocks of a prefix are the least likely to be shared with another turn.
        self._pool.free_blocks(pin.blocks[::-1])
        self.releases[reason] += 1
        self.num_pinned_blocks -= pin.num_blocks
        self.version += 1
        return pin

    def expire(self, now_s: float, has_waiting_request: Callable[[str], bool]) -> list[Pin]:
        """Release every pin past its deadline whose program has no request waiting."""
        while self._deadlines and self._deadlines[0][0] < now_s:
            pin = heapq.heappop(self._deadlines)[2]
            if self._pins.get(pin.program_id) is pin:
                self._overdue[pin.program_id] = pin
        released: list[Pin] = []
        if not self._overdue:
            return released
        for program_id, pin in list(self._overdue.items()):
            if self._pins.get(program_id) is not pin:
                del self._overdue[program_id]
            elif not has_waiting_request(program_id):
                del self._overdue[program_id]
                released.append(pin)
                self.release(program_id, ReleaseReason.EXPIRED)
        return released

    def release_for(
        self,
        shortfall: Callable[[], int],
        *,
        keep: AbstractSet[int] = frozenset(),
        first: str | None = None,
        all_or_nothing: bool = False,
    ) -> list[Pin]:
        """Release pins in pressure order while ``shortfall()`` (blocks still missing,
        read from the pool after each release) is positive.

        Only pins that can lower it are released: a block comes back to the pool only
        once nothing but pins holds it, and blocks in ``keep`` (the requester's own prefix
        hit, which its allocation takes straight back) never help. ``first`` names a
        program whose pin goes first (the requester's own pin beyond its hit is waste).
        With ``all_or_nothing`` nothing is released unless releasing every pin that can
        help would end the shortfall: a request that cannot fit anyway must not flush
        every pin on each step. Pins are released whole: a partial pin would keep a
        prefix with a hole in it, which no later turn could hit past the hole.
        """
        if shortfall() <= 0 or not self._pins:
            return []
        candidates = sorted(self._pins.values(), key=self._pressure_order)
        if first is not None and (own := self._pins.get(first)) is not None:
            candidates.remove(own)
            candidates.insert(0, own)
        holders = self._holders(candidates)
        if all_or_nothing and shortfall() > self._freeable(candidates, holders, keep):
            return []
        released: list[Pin] = []
        for pin in candidates:
            if shortfall() <= 0:
                break
            if self._freeable([pin], holders, keep):
                self.release(pin.program_id, ReleaseReason.PRESSURE)
                released.append(pin)
            holders.subtract(id(b) for b in pin.blocks)
        return released

    def release_until_free(self, free_blocks: int) -> list[Pin]:
        """Release pins in pressure order until the pool has ``free_blocks`` free."""
        return self.release_for(lambda: free_blocks - self._pool.get_num_free_blocks())

    @staticmethod
    def _holders(pins: Sequence[Pin]) -> Counter[int]:
        """How many of ``pins`` hold each block (by identity)."""
        return Counter(id(b) for pin in pins for b in pin.blocks)

    @staticmethod
    def _freeable(pins: Sequence[Pin], holders: Counter[int], keep: AbstractSet[int]) -> int:
        """Distinct blocks of ``pins``, not in ``keep``, that only pins hold (``holders``
        counts the pins holding each block): what releasing those pins can free."""
        blocks = {id(b): b for pin in pins for b in pin.blocks if id(b) not in keep}
        return sum(1 for key, b in blocks.items() if b.ref_cnt <= holders[key])  # type: ignore[attr-defined]

    def holds_every_used_block(self) -> bool:
        """Whether releasing every pin would leave no block in use (but the null block):
        then a prefix-cache reset, which vLLM refuses while any block is held, succeeds."""
        pins = list(self._pins.values())
        freeable = self._freeable(pins, self._holders(pins), frozenset())
        return self._pool.get_num_free_blocks() + freeable == self._pool.num_gpu_blocks - 1

    def release_all(self, reason: ReleaseReason) -> list[Pin]:
        pins = list(self._pins.values())
        for pin in pins:
            self.release(pin.program_id, reason)
        return pins
