"""Redis GET and SET of KV chunks (the "remote" tier: LMCache's remote backend).

LMCache keeps each KV chunk (``LMCACHE_CHUNK_TOKENS`` tokens) as one Redis value and moves a
prefix's chunks as concurrent requests on one asyncio event loop (its ``RedisConnector``
gathers them over a pool of up to 150 connections). Each size here is timed the same way:
the context cut into chunk-sized values, all of them SET (the store direction) or all GET
(the load direction) at once through ``redis.asyncio``, on connections already open. The
duplex figure is the largest GET while a second thread keeps SETting another context of
that size. Keys carry a prefix unique to the run and are deleted at the end.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from tqdm import tqdm

from continuum_tiered.core.remote_tier import RemoteTierError, check_remote
from continuum_tiered.profiling.measure import ProfilingError, Series, Timed, background_load

CONNECTIONS = 150  # LMCache's RedisConnector: max_connections and its semaphore


@dataclass(frozen=True)
class RemoteResult:
    series: list[Series]
    duplex: list[Timed]  # the largest load under a concurrent store load
    notes: list[str]


def check_server(url: str) -> None:
    try:
        check_remote(url)
    except RemoteTierError as error:
        raise ProfilingError(f"--tiers: {error}") from None


def remote_budget_bytes(url: str) -> int | None:
    """A quarter of the server's ``maxmemory`` (the profiler holds two contexts there at
    once, and past it Redis evicts); None where it is unbounded or not told."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        limit = int(client.config_get("maxmemory").get("maxmemory", 0))
    except redis.RedisError:  # managed servers may refuse CONFIG
        return None
    finally:
        client.close()
    return limit // 4 if limit > 0 else None


def measure_remote(url: str, sizes: list[int], chunk_bytes: int, repeats: int) -> RemoteResult:
    run = f"continuum-profile-{uuid.uuid4().hex}"
    try:
        return asyncio.run(_measure(url, run, sizes, chunk_bytes, repeats))
    finally:
        client = redis.Redis.from_url(url, socket_timeout=30)
        for keys in _batches(list(client.scan_iter(match=f"{run}:*", count=1000))):
            client.delete(*keys)
        client.close()


async def _measure(
    url: str, run: str, sizes: list[int], chunk_bytes: int, repeats: int
) -> RemoteResult:
    value = os.urandom(chunk_bytes)  # random: nothing on the way compresses it
    stores, loads = [], []
    async with _client(url) as client:
        with tqdm(total=(len(sizes) + 1) * repeats, desc="remote tier", unit="context") as bar:
            await _store(client, f"{run}:warm", value, chunk_bytes)  # opens the connections
            for size in sizes:
                store_s, load_s = [], []
                for i in range(repeats):
                    prefix = f"{run}:{size}:{i}"
                    store_s.append(await _timed(_store(client, prefix, value, size)))
                    load_s.append(await _timed(_load(client, prefix, size, chunk_bytes)))
                    bar.update()
                stores.append(statistics.median(store_s))
                loads.append(statistics.median(load_s))
            largest = f"{run}:{sizes[-1]}:0"

            def store_other() -> None:
                asyncio.run(_store_fresh(url, f"{run}:concurrent", value, sizes[-1]))

            with background_load(store_other):
                load_s = []
                for _ in range(repeats):
                    load_s.append(await _timed(_load(client, largest, sizes[-1], chunk_bytes)))
                    bar.update()
    backends = ("redis",) * len(sizes)
    series = [
        Series("remote", "redis GET", True, tuple(sizes), tuple(loads), backends),
        Series("remote", "redis SET", False, tuple(sizes), tuple(stores), backends),
    ]
    duplex = Timed("remote", "redis GET during SET", sizes[-1], statistics.median(load_s))
    notes = [
        f"remote tier: {_host_of(url)}, {chunk_bytes}-byte values (one LMCache chunk) moved "
        f"concurrently through redis.asyncio, up to {CONNECTIONS} connections; duplex: the "
        f"{sizes[-1]}-byte GET while a second thread SETs another context of that size"
    ]
    return RemoteResult(series, [duplex], notes)


def _client(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=CONNECTIONS)
    return aioredis.Redis.from_pool(pool)  # closes the pool with the client


async def _store_fresh(url: str, prefix: str, value: bytes, size: int) -> None:
    """A store on its own client: the concurrent load runs on another thread's event loop."""
    async with _client(url) as client:
        await _store(client, prefix, value, size)


async def _store(client: aioredis.Redis, prefix: str, value: bytes, size: int) -> None:
    lengths = _chunk_lengths(size, len(value))
    await asyncio.gather(*(client.set(f"{prefix}:{i}", value[:n]) for i, n in enumerate(lengths)))


async def _load(client: aioredis.Redis, prefix: str, size: int, chunk_bytes: int) -> None:
    lengths = _chunk_lengths(size, chunk_bytes)
    values = await asyncio.gather(*(client.get(f"{prefix}:{i}") for i in range(len(lengths))))
    for i, (got, n) in enumerate(zip(values, lengths, strict=True)):
        if got is None or len(got) != n:
            raise ProfilingError(
                f"remote tier: chunk {i} of a {size}-byte context came back "
                f"{'missing' if got is None else f'{len(got)} bytes long'} (evicted? raise the "
                "server's maxmemory or profile with --max-tokens)"
            )


def _chunk_lengths(size: int, chunk_bytes: int) -> list[int]:
    full, rest = divmod(size, chunk_bytes)
    return [chunk_bytes] * full + ([rest] if rest else [])


async def _timed(operation: Awaitable[None]) -> float:
    start = time.perf_counter()
    await operation
    return time.perf_counter() - start


def _batches(keys: list[bytes], n: int = 1000) -> list[list[bytes]]:
    return [keys[i : i + n] for i in range(0, len(keys), n)]


def _host_of(url: str) -> str:
    """The server, without credentials, for the profile's source text."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"
