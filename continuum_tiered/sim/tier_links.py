"""The links KV crosses between the GPU and LMCache's tiers, with stores and contention.

What LMCache 0.5.6 does, read from its source (``lmcache/v1/storage_backend/``):

- ``StorageManager.batched_put`` hands every stored chunk to every backend: a chunk goes
  to the CPU tier *and* to the disk tier, not to disk only when the CPU tier evicts it.
- ``LocalDiskBackend.submit_put_task`` queues the disk write on a thread pool with no
  bound on the queue and takes a reference on the CPU copy until the write is done; the
  key is found on disk only once written.
- ``LocalCPUBackend.allocate`` for a store does not wait (``busy_loop=False``): when every
  CPU chunk is referenced (each still waiting for its disk write), the store is skipped.
  That is how a disk that cannot keep up drops stores.
- The GPU->host copy of a store runs in the step that computed the KV (``wait_for_save``
  at the end of the forward pass, or layer by layer with ``use_layerwise``).

So a store costs device->host bandwidth in its step, and host memory plus disk write
bandwidth after it; a load costs host->device bandwidth, and disk read bandwidth for
disk hits, which a concurrent write backlog slows to the profile's read-under-write
figure. Loads and stores of one step share the PCIe link per direction at the profile's
duplex figure when they overlap (layer-wise); synchronous loads run before the forward
pass and stores after it, so they do not overlap.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

from continuum_tiered.core.profile import Tier


@dataclass(frozen=True)
class LinkFigures:
    """Bytes per second of each direction, alone and while the other one runs."""

    h2d: float  # host -> device: loads
    d2h: float  # device -> host: stores
    h2d_duplex: float
    d2h_duplex: float
    disk_read: float
    disk_write: float
    disk_read_under_write: float
    disk_latency_s: float
    pcie_latency_s: float

    @classmethod
    def from_tiers(cls, cpu: Tier, disk: Tier | None, host_memcpy: float | None) -> LinkFigures:
        """A buffered disk read or write also copies through host memory: the slower of
        the disk and one thread's memcpy bounds it."""
        cap = host_memcpy or float("inf")
        disk = disk or Tier("disk", float("inf"), 0.0)
        return cls(
            h2d=cpu.bandwidth_bytes_per_s,
            d2h=cpu.write_bandwidth,
            h2d_duplex=cpu.duplex_bandwidth,
            d2h_duplex=cpu.duplex_write_bandwidth,
            disk_read=min(disk.bandwidth_bytes_per_s, cap),
            disk_write=min(disk.write_bandwidth, cap),
            disk_read_under_write=min(disk.duplex_bandwidth, cap),
            disk_latency_s=disk.latency_s,
            pcie_latency_s=cpu.latency_s,
        )

    def to_json(self) -> dict[str, float]:
        return dict(self.__dict__)


def duplex_s(h2d_bytes: float, d2h_bytes: float, links: LinkFigures) -> float:
    """Both directions started together: each runs at its duplex rate while the other is
    active, then at its one-direction rate; the time until both are done."""
    if h2d_bytes <= 0 or d2h_bytes <= 0:
        return h2d_bytes / links.h2d + d2h_bytes / links.d2h
    t_load, t_store = h2d_bytes / links.h2d_duplex, d2h_bytes / links.d2h_duplex
    both = min(t_load, t_store)
    if t_load > t_store:
        return both + (h2d_bytes - both * links.h2d_duplex) / links.h2d
    return both + (d2h_bytes - both * links.d2h_duplex) / links.d2h


class DiskWriteQueue:
    """LMCache's disk writes: first come first served at the disk's write bandwidth, with
    no bound on the queue. A key is readable once its write is done; until then it holds
    its CPU copy (``pending_blocks``)."""

    def __init__(self, write_bytes_per_s: float):
        self.write_bytes_per_s = write_bytes_per_s
        self.free_at = 0.0  # when the queued writes are done
        self._pending: OrderedDict[Hashable, float] = OrderedDict()  # key -> done at
        self.blocks_written = 0
        self.delay_sum_s = 0.0  # from submission to done, summed over blocks
        self.delay_max_s = 0.0

    def submit(self, now: float, keys: Iterable[Hashable], block_bytes: int) -> None:
        for key in keys:
            if key in self._pending:
                continue  # LMCache skips a write already in flight
            self.free_at = max(self.free_at, now) + block_bytes / self.write_bytes_per_s
            self._pending[key] = self.free_at
            delay = self.free_at - now
            self.blocks_written += 1
            self.delay_sum_s += delay
            self.delay_max_s = max(self.delay_max_s, delay)

    def settle(self, now: float) -> None:
        """Forget writes done by ``now`` (they finish in submission order)."""
        while self._pending and next(iter(self._pending.values())) <= now:
            self._pending.popitem(last=False)

    def is_pending(self, key: Hashable) -> bool:
        return key in self._pending

    def done_at(self, key: Hashable) -> float:
        """When the pending write of ``key`` is done."""
        return self._pending[key]

    def drop_pending(self) -> list[Hashable]:
        """Abandon the writes not done (the writer is gone); their keys."""
        keys = list(self._pending)
        self._pending.clear()
        return keys

    @property
    def pending_blocks(self) -> int:
        return len(self._pending)

    def busy(self, now: float) -> bool:
        return self.free_at > now

    def yield_to_read(self, now: float, read_s: float) -> None:
        """A read served while writes are queued pushes them back by its duration."""
        if self.busy(now):
            self.free_at += read_s


@dataclass
class StoreStats:
    """What the replay reports about stores."""

    blocks_stored: int = 0
    blocks_dropped: int = 0  # the CPU tier was full of chunks waiting for their disk write
    disk_blocks_written: int = 0
    disk_write_delay_mean_s: float = 0.0
    disk_write_delay_max_s: float = 0.0

    @classmethod
    def combined(cls, stats: Sequence[StoreStats]) -> StoreStats:
        """Several replicas' stores as one: counts summed, delays over all disk writes."""
        written = sum(s.disk_blocks_written for s in stats)
        delay_sum = sum(s.disk_write_delay_mean_s * s.disk_blocks_written for s in stats)
        return cls(
            blocks_stored=sum(s.blocks_stored for s in stats),
            blocks_dropped=sum(s.blocks_dropped for s in stats),
            disk_blocks_written=written,
            disk_write_delay_mean_s=delay_sum / written if written else 0.0,
            disk_write_delay_max_s=max((s.disk_write_delay_max_s for s in stats), default=0.0),
        )

    def to_json(self) -> dict[str, float]:
        return dict(self.__dict__)
