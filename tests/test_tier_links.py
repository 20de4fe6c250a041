"""The link model of LMCache's tiers: duplex PCIe transfers and the disk write queue."""

from __future__ import annotations

import pytest

from continuum_tiered.core.profile import Tier
from continuum_tiered.sim.tier_links import DiskWriteQueue, LinkFigures, duplex_s

LINKS = LinkFigures.from_tiers(
    Tier("cpu", 10.0, 0.0, write_bandwidth_bytes_per_s=20.0, duplex_bandwidth_bytes_per_s=5.0),
    Tier("disk", 4.0, 0.0, write_bandwidth_bytes_per_s=2.0, duplex_bandwidth_bytes_per_s=1.0),
    host_memcpy=3.0,
)


def test_figures_fall_back_and_the_host_copy_caps_the_disk():
    assert (LINKS.h2d, LINKS.d2h, LINKS.h2d_duplex, LINKS.d2h_duplex) == (10, 20, 5, 5)
    # A buffered disk read or write is also a host memcpy at 3 B/s.
    assert (LINKS.disk_read, LINKS.disk_write, LINKS.disk_read_under_write) == (3, 2, 1)


def test_one_direction_alone_runs_at_its_full_rate():
    assert duplex_s(100, 0, LINKS) == pytest.approx(10.0)
    assert duplex_s(0, 100, LINKS) == pytest.approx(5.0)


def test_both_directions_share_the_link_until_one_is_done():
    # 100 B each way at 5 B/s while both run: the load (10 B/s alone) and the store
    # (20 B/s alone) both take 20 s, neither finishes earlier.
    assert duplex_s(100, 100, LINKS) == pytest.approx(20.0)
    # 50 B of load done at 5 B/s in 10 s; meanwhile 50 B of the store moved; its other
    # 150 B then run alone at 20 B/s: 7.5 s more.
    assert duplex_s(50, 200, LINKS) == pytest.approx(17.5)


def test_disk_writes_queue_in_order_and_skip_a_write_in_flight():
    queue = DiskWriteQueue(write_bytes_per_s=2.0)
    queue.submit(0.0, ["a", "b"], block_bytes=4)  # 2 s each: a done at 2, b at 4
    queue.submit(1.0, ["b", "c"], block_bytes=4)  # b is in flight; c waits for b: done at 6
    assert queue.pending_blocks == 3 and queue.busy(5.9)
    assert queue.blocks_written == 3
    assert queue.delay_max_s == pytest.approx(5.0)  # c: submitted at 1, done at 6
    assert queue.delay_sum_s == pytest.approx(2 + 4 + 5)
    queue.settle(4.0)
    assert not queue.is_pending("a") and not queue.is_pending("b") and queue.is_pending("c")
    queue.yield_to_read(5.0, read_s=1.0)  # a read while c is written pushes c back
    assert queue.free_at == pytest.approx(7.0)
    queue.settle(7.0)
    assert queue.pending_blocks == 0 and not queue.busy(7.0)
    queue.yield_to_read(8.0, read_s=1.0)  # an idle disk owes nothing
    assert queue.free_at == pytest.approx(7.0)
