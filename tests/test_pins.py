"""PinTable bookkeeping on vLLM's real BlockPool (no scheduler)."""

from __future__ import annotations

import pytest
from vllm.v1.core.block_pool import BlockPool

from continuum_tiered.core.pins import Pin, PinTable, ReleaseReason


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(num_gpu_blocks=32, enable_caching=True, hash_block_size=32)


def make_pin(pool: BlockPool, program: str, seq: int, n: int, deadline: float) -> Pin:
    blocks = pool.get_new_blocks(n)
    pool.free_blocks(blocks)  # as a finished request leaves them: ref_cnt 0, reusable
    return Pin(program, seq, blocks, 0.0, deadline, "grep", n * 32)


def test_pin_holds_a_reference_until_released(pool):
    table = PinTable(pool)
    free = pool.get_num_free_blocks()
    pin = make_pin(pool, "A", 0, 4, deadline=10.0)
    table.pin(pin)
    assert pool.get_num_free_blocks() == free - 4
    assert all(b.ref_cnt == 1 for b in pin.blocks)
    table.release("A", ReleaseReason.HANDED_OVER)
    assert pool.get_num_free_blocks() == free
    assert table.releases[ReleaseReason.HANDED_OVER] == 1


def test_expiry_waits_for_the_deadline_and_for_no_waiting_request(pool):
    table = PinTable(pool)
    table.pin(make_pin(pool, "A", 0, 2, deadline=5.0))
    table.pin(make_pin(pool, "B", 1, 2, deadline=5.0))
    waiting = {"B"}
    assert table.expire(4.0, waiting.__contains__) == []
    assert [p.program_id for p in table.expire(6.0, waiting.__contains__)] == ["A"]
    assert table.get("B") is not None  # overdue, but its next turn is queued
    waiting.clear()
    assert [p.program_id for p in table.expire(6.1, waiting.__contains__)] == ["B"]
    assert len(table) == 0 and table.releases[ReleaseReason.EXPIRED] == 2


def test_replacing_a_pin_keeps_shared_blocks_referenced(pool):
    table = PinTable(pool)
    first = make_pin(pool, "A", 0, 3, deadline=5.0)
    table.pin(first)
    extended = Pin("A", 0, [*first.blocks, *pool.get_new_blocks(1)], 1.0, 50.0, None, 128)
    pool.free_blocks(extended.blocks[-1:])
    table.pin(extended)
    assert all(b.ref_cnt == 1 for b in extended.blocks)
    # The replaced pin's old deadline must not expire the new one.
    assert table.expire(10.0, lambda _: False) == []
    assert table.get("A") is extended


def test_pressure_releases_latest_program_first(pool):
    table = PinTable(pool)
    for seq, program in enumerate("ABC"):
        table.pin(make_pin(pool, program, seq, 8, deadline=100.0))
    assert pool.get_num_free_blocks() == 31 - 24
    released = table.release_until_free(15)
    assert [p.program_id for p in released] == ["C"]
    assert pool.get_num_free_blocks() == 15
    assert [p.program_id for p in table.release_until_free(16)] == ["B"]
    assert table.releases[ReleaseReason.PRESSURE] == 2


def test_pressure_takes_the_named_pin_first(pool):
    table = PinTable(pool)
    for seq, program in enumerate("ABC"):
        table.pin(make_pin(pool, program, seq, 8, deadline=100.0))
    released = table.release_for(lambda: 8 - pool.get_num_free_blocks(), first="A")
    assert [p.program_id for p in released] == ["A"]


def test_pressure_never_releases_a_pin_that_frees_nothing(pool):
    """B's blocks are all shared with a running request (a second reference), and A's are
    the requester's own hit (``keep``): releasing either would free no block to allocate."""
    table = PinTable(pool)
    a = make_pin(pool, "A", 0, 4, deadline=100.0)
    table.pin(a)
    b = make_pin(pool, "B", 1, 4, deadline=100.0)
    table.pin(b)
    pool.touch(b.blocks)  # a running request holds them too
    hit = frozenset(id(x) for x in a.blocks)
    assert table.release_for(lambda: 1, keep=hit) == []
    assert len(table) == 2
    pool.free_blocks(b.blocks)
    assert [p.program_id for p in table.release_for(lambda: 1, keep=hit)] == ["B"]


def test_blocks_shared_by_two_pins_come_back_once_both_go(pool):
    table = PinTable(pool)
    shared = make_pin(pool, "A", 0, 4, deadline=100.0)
    table.pin(shared)
    table.pin(Pin("B", 1, list(shared.blocks), 0.0, 100.0, "grep", 128))
    free = pool.get_num_free_blocks()
    released = table.release_until_free(free + 4)
    assert {p.program_id for p in released} == {"A", "B"}
    assert pool.get_num_free_blocks() == free + 4


def test_all_or_nothing_keeps_every_pin_when_they_cannot_make_room(pool):
    table = PinTable(pool)
    for seq, program in enumerate("ABC"):
        table.pin(make_pin(pool, program, seq, 8, deadline=100.0))
    free = pool.get_num_free_blocks()  # 7 free, 24 pinned

    def short_of(target: int):
        return lambda: target - pool.get_num_free_blocks()

    assert table.release_for(short_of(free + 25), all_or_nothing=True) == []
    assert len(table) == 3
    assert len(table.release_for(short_of(free + 24), all_or_nothing=True)) == 3


def test_deadline_heap_stays_bounded_under_churn(pool):
    table = PinTable(pool)
    for i in range(500):
        table.pin(make_pin(pool, "A", 0, 1, deadline=1000.0 + i))
    assert len(table._deadlines) <= 2 * len(table) + 65
    table.release_all(ReleaseReason.SHUTDOWN)
    assert pool.get_num_free_blocks() == 31
