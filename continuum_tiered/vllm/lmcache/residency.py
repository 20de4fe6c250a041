"""Which LMCache tier holds a token sequence's KV, read from LMCache's own storage manager.

LMCache keys KV by chunk (``chunk_size`` tokens, prefix-hashed). A prefix lookup walks the
backends in order (CPU, then disk, then the remote tier) and takes each backend's run of
leading chunks, which is how a retrieve assembles the prefix; this module asks the same
question with ``StorageManager.batched_contains`` (no pin, so nothing is held) and reports,
chunk by chunk, which tier would serve it.

It runs where LMCache's engine lives, the worker process (found through
``LMCacheEngineBuilder``); ``ContinuumTieredConnector`` sends the answers to the scheduler.
Where LMCache failed to start, every lookup answers "nowhere".

The disk tier's failures degrade to recompute, with a warning: chunks whose files were
deleted are forgotten before a load (``forget_vanished_disk_chunks``), and a write that fails
(a full disk, a removed directory) leaves no trace in LMCache (``guard_disk_writes``).

All of it reads LMCache's internals, so building an ``LMCacheResidency`` (every
``ContinuumTieredConnector`` does) first checks the installed LMCache
(``compat.check_lmcache``) and raises on one it was not checked against.
"""

from __future__ import annotations

import contextlib
import functools
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

from continuum_tiered.core.tier_model import TIER_ORDER
from continuum_tiered.vllm import compat

logger = init_logger(__name__)

# LMCache backend name -> tier name in tier profiles and connector stats.
# LMCache 0.5.6 names the backend of ``remote_url`` after its class, ``RemoteBackend``.
TIER_OF_BACKEND = {"LocalCPUBackend": "cpu", "LocalDiskBackend": "disk", "RemoteBackend": "remote"}
# Disk backends whose last write failed: one warning per run of failures.
_failing_disks: weakref.WeakSet[Any] = weakref.WeakSet()


@dataclass(frozen=True)
class ChunkSpan:
    start: int
    end: int
    tier: str


class LMCacheResidency:
    def __init__(self, engine_name: str = "vllm-instance"):
        self.engine_name = engine_name
        self._warned = False
        compat.check_lmcache()
        # Here because every connector that reads LMCache's tiers builds one, on any platform.
        guard_disk_writes()

    def spans(self, tokens: Sequence[int], request_configs: dict | None = None) -> list[ChunkSpan]:
        """The leading chunks of ``tokens`` that LMCache holds, each with its tier."""
        engine = self._engine()
        if engine is None or not tokens:
            return []
        chunks = list(
            engine.token_database.process_tokens(
                tokens=list(tokens), request_configs=request_configs
            )
        )
        if not chunks:
            return []
        _, by_backend = engine.storage_manager.batched_contains([c[2] for c in chunks])
        spans = []
        for backend, keys in by_backend.items():
            tier = TIER_OF_BACKEND.get(backend, backend)
            for start, end, _ in chunks[len(spans) : len(spans) + len(keys)]:
                spans.append(ChunkSpan(start, end, tier))
        return spans

    def tier_of(self, tokens: Sequence[int], request_configs: dict | None = None) -> str | None:
        """The tier a reload of ``tokens``' cached prefix waits on: the slowest one that
        holds part of it; None when LMCache holds none of it."""
        tiers = {span.tier for span in self.spans(tokens, request_configs)}
        if not tiers:
            return None
        return max(tiers, key=lambda t: TIER_ORDER.index(t) if t in TIER_ORDER else -1)

    def tokens_per_tier(
        self, tokens: Sequence[int], start: int, end: int, request_configs: dict | None = None
    ) -> dict[str, int]:
        """How many of the tokens ``start:end`` each tier holds."""
        counts: dict[str, int] = {}
        for span in self.spans(tokens[:end], request_configs):
            overlap = min(span.end, end) - max(span.start, start)
            if overlap > 0:
                counts[span.tier] = counts.get(span.tier, 0) + overlap
        return counts

    def forget_vanished_disk_chunks(
        self, tokens: Sequence[int], request_configs: dict | None = None
    ) -> int:
        """Drop from LMCache's disk index the chunks of ``tokens`` whose file is gone.

        LMCache's disk backend reads a missing file as a warning and hands the unfilled
        buffer on as KV; forgetting the chunk first makes the retrieve come up short, which
        LMCache reports as failed blocks and vLLM recomputes. Returns the chunks dropped.
        """
        engine = self._engine()
        backend = (
            engine.storage_manager.storage_backends.get("LocalDiskBackend") if engine else None
        )
        if backend is None:
            return 0
        dropped = 0
        for chunk in engine.token_database.process_tokens(
            tokens=list(tokens), request_configs=request_configs
        ):
            key = chunk[2]
            with backend.disk_lock:
                meta = backend.dict.get(key)
                if meta is not None and not os.path.exists(meta.path):
                    del backend.dict[key]
                    backend.usage -= meta.size
                    dropped += 1
        if dropped:
            logger.warning(
                "continuum-tiered: %d LMCache disk chunks vanished from %s; recomputing them",
                dropped,
                backend.path,
            )
        return dropped

    def _engine(self) -> Any:
        from lmcache.v1.cache_engine import LMCacheEngineBuilder

        engine = LMCacheEngineBuilder.get(self.engine_name)
        if engine is None or engine.storage_manager is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "continuum-tiered: no LMCache engine in this worker (LMCache failed to "
                    "start?); tier residency is unknown and TTLs assume recompute"
                )
            return None
        return engine


def guard_disk_writes() -> bool:
    """Make a failed write to LMCache's disk tier leave no trace, with a warning.

    In LMCache 0.5.6, ``LocalDiskBackend.async_save_bytes_to_disk`` (run by the disk worker)
    does nothing when ``write_file`` raises, e.g. ENOSPC on a full disk: the chunk stays
    counted in ``usage`` and in the admission total ``current_cache_size`` that
    ``submit_put_task`` raised, the memory object keeps the reference ``submit_put_task``
    took (so the CPU tier can never evict it), the key stays in the worker's put tasks (so
    it is never written again, even once there is room), the partial file stays, and the
    error lands in a future nobody reads, unlogged. This wrap undoes all of that, so the
    chunk is just not on disk: a later turn finds it in the CPU tier or recomputes it.
    Upstream, the same cleanup in ``async_save_bytes_to_disk`` (``try``/``except`` around
    ``write_file``) would make it unnecessary.

    The undo mirrors the bookkeeping of the versions in ``compat.CHECKED_LMCACHE`` exactly;
    on another version this raises ``compat.CompatError``. Returns True once it is in
    place; safe to call more than once.
    """
    compat.check_lmcache()
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend

    save = LocalDiskBackend.async_save_bytes_to_disk
    if getattr(save, "_continuum_guard", False):
        return True
    LocalDiskBackend.async_save_bytes_to_disk = _undoing_failed_writes(save)
    return True


def _undoing_failed_writes(save: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(save)
    def save_or_undo(
        backend: Any,
        key: Any,
        memory_obj: Any,
        on_complete_callback: Callable[[Any], None] | None = None,
    ) -> None:
        try:
            save(backend, key, memory_obj, on_complete_callback)
        except OSError as error:  # only write_file does I/O, after usage was raised
            _undo_failed_write(backend, key, memory_obj)
            if isinstance(error, FileNotFoundError):
                # The tier's directory was removed under it: LMCache creates it only at
                # start, so make it again for the next chunk, or the tier stays dead.
                with contextlib.suppress(OSError):
                    os.makedirs(backend.path, exist_ok=True)
            # One warning per run of failures: on a full disk every chunk's write fails.
            if backend not in _failing_disks:
                logger.warning(
                    "continuum-tiered: LMCache disk tier %s cannot store KV chunks (%s); "
                    "they stay in the CPU tier only and are recomputed once they leave it",
                    backend.path,
                    error,
                )
            _failing_disks.add(backend)
            return
        if backend in _failing_disks:
            _failing_disks.discard(backend)
            logger.info("continuum-tiered: LMCache disk tier %s stores again", backend.path)

    save_or_undo._continuum_guard = True  # type: ignore[attr-defined]
    return save_or_undo


def _undo_failed_write(backend: Any, key: Any, memory_obj: Any) -> None:
    """Reverse what ``submit_put_task`` and ``async_save_bytes_to_disk`` did for ``key``."""
    with backend.disk_lock:
        backend.usage -= len(memory_obj.byte_array)
        backend.current_cache_size -= memory_obj.get_physical_size()
        backend.cache_policy.update_on_force_evict(key)
    backend.stats_monitor.update_local_storage_usage(backend.usage)
    with contextlib.suppress(OSError):
        os.remove(compat.lmcache_disk_path(backend, key))
    memory_obj.ref_count_down()
    backend.disk_worker.remove_put_task(key)
