"""PinTable bookkeeping on vLLM's real BlockPool (no scheduler)."""

from __future__ import annotations

import pytest
from vllm.v1.core.block_pool import BlockPool

from continuum_tiered.pins import Pin, PinTable, ReleaseReason


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


def test_pressure_releases_latest_program_first_and_spares_the_requester(pool):
    table = PinTable(pool)
    for seq, program in enumerate("ABC"):
        table.pin(make_pin(pool, program, seq, 8, deadline=100.0))
    assert pool.get_num_free_blocks() == 31 - 24
    released = table.release_for(15, spare="C")
    assert [p.program_id for p in released] == ["B"]
    assert pool.get_num_free_blocks() == 15
    released = table.release_for(20, spare="C")
    assert [p.program_id for p in released] == ["A"]
    assert table.release_for(31, spare="C") == []  # the spared pin is never taken
    assert table.get("C") is not None


def test_deadline_heap_stays_bounded_under_churn(pool):
    table = PinTable(pool)
    for i in range(500):
        table.pin(make_pin(pool, "A", 0, 1, deadline=1000.0 + i))
    assert len(table._deadlines) <= 2 * len(table) + 65
    table.release_all(ReleaseReason.SHUTDOWN)
    assert pool.get_num_free_blocks() == 31
