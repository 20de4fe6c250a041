"""Which LMCache tier holds a token sequence's KV, read from LMCache's own storage manager.

LMCache keys KV by chunk (``chunk_size`` tokens, prefix-hashed). A prefix lookup walks the
backends in order (CPU, then disk) and takes each backend's run of leading chunks, which
is how a retrieve assembles the prefix; this module asks the same question with
``StorageManager.batched_contains`` (no pin, so nothing is held) and reports, chunk by chunk,
which tier would serve it.

It runs where LMCache's engine lives, the worker process (found through
``LMCacheEngineBuilder``); ``ContinuumTieredConnector`` sends the answers to the scheduler.
Where LMCache failed to start, every lookup answers "nowhere".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# LMCache backend name -> tier name in tier profiles and connector stats.
TIER_OF_BACKEND = {"LocalCPUBackend": "cpu", "LocalDiskBackend": "disk"}
# Slowest last: a prefix split across tiers reloads at the pace of the slowest.
TIER_ORDER = ("cpu", "disk")


@dataclass(frozen=True)
class ChunkSpan:
    start: int
    end: int
    tier: str


class LMCacheResidency:
    def __init__(self, engine_name: str = "vllm-instance"):
        self.engine_name = engine_name
        self._warned = False

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
