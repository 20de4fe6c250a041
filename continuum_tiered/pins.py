"""Pins: extra references on a finished turn's KV blocks, held for a time-to-live.

A pin is one reference per block, taken with ``BlockPool.touch`` and given back with
``BlockPool.free_blocks`` (DESIGN.md section 3). While pinned, the blocks stay out of the
free queue and their hashes stay in the prefix-cache map, so the program's next turn gets
an ordinary prefix hit. This module holds the bookkeeping and nothing vLLM-specific: the
pool is anything with ``touch``, ``free_blocks`` and ``get_num_free_blocks``, which keeps
it testable without an engine. All calls must come from the scheduler thread.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


class BlockPoolLike(Protocol):
    def touch(self, blocks: Sequence[object]) -> None: ...

    def free_blocks(self, ordered_blocks: Sequence[object]) -> None: ...

    def get_num_free_blocks(self) -> int: ...


class ReleaseReason(enum.Enum):
    HANDED_OVER = "handed_over"  # the program's next turn was allocated
    EXPIRED = "expired"  # deadline passed while the program had nothing waiting
    PRESSURE = "pressure"  # another request needed the memory
    REPLACED = "replaced"  # the program finished another turn and pinned that one
    PROGRAM_ENDED = "program_ended"
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
        self._pool.free_blocks(list(reversed(pin.blocks)))
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

    def release_for(self, free_blocks_needed: int, spare: str | None = None) -> list[Pin]:
        """Release pins in pressure order until the pool has ``free_blocks_needed`` free.

        ``spare`` names a program whose pin must survive (the requester's own prefix).
        Pins are released whole: a partial pin would keep a prefix with a hole in it,
        which no later turn could hit past the hole.
        """
        released: list[Pin] = []
        candidates = sorted(
            (p for p in self._pins.values() if p.program_id != spare), key=self._pressure_order
        )
        for pin in candidates:
            if self._pool.get_num_free_blocks() >= free_blocks_needed:
                break
            self.release(pin.program_id, ReleaseReason.PRESSURE)
            released.append(pin)
        return released

    def release_all(self, reason: ReleaseReason) -> None:
        for program_id in list(self._pins):
            self.release(program_id, reason)
