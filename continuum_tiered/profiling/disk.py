"""Disk write and read bandwidth through aiofiles (the "disk" tier).

Every write ends with fsync. Before every read the file's pages are dropped from the
page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` and ``mincore`` counts how many
stayed, so the read figure is a disk figure and the output says whether it really was.
The duplex figure is the read of the largest file while a second thread keeps writing
(and fsyncing) another file of that size in the same directory.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import torch
from tqdm import tqdm

from continuum_tiered.profiling.measure import ProfilingError, Series, Timed, background_load

CHUNK_BYTES = 16 << 20  # one aiofiles call moves at most this much
_DROP = "page cache dropped with posix_fadvise(POSIX_FADV_DONTNEED) after fsync"


@dataclass(frozen=True)
class DiskResult:
    series: list[Series]
    duplex: list[Timed]  # the largest read under a concurrent write load
    notes: list[str]


def check_directory(path: Path) -> None:
    """Refuse a path that is not a directory this process can create files in."""
    if not path.is_dir():
        raise ProfilingError(f"disk tier directory {path} does not exist or is not a directory")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ProfilingError(f"disk tier directory {path} is not writable: {exc}") from exc


def disk_budget_bytes(path: Path) -> int:
    """A quarter of the free space: the largest file the profiler writes there (it writes
    two at once, the timed one and the concurrent load's)."""
    return shutil.disk_usage(path).free // 4


def measure_disk(directory: Path, sizes: list[int], repeats: int) -> DiskResult:
    return asyncio.run(_measure(directory, sizes, repeats))


async def _measure(directory: Path, sizes: list[int], repeats: int) -> DiskResult:
    # Random bytes, so neither a compressing file system nor a deduplicating disk helps.
    data = memoryview(torch.randint(0, 256, (sizes[-1],), dtype=torch.uint8).numpy())
    buffer = memoryview(bytearray(sizes[-1]))
    writes, reads, still_cached = [], [], []
    with (
        tempfile.TemporaryDirectory(dir=directory, prefix="continuum-profile-") as tmp,
        tqdm(total=(len(sizes) + 1) * repeats, desc="disk tier", unit="file") as bar,
    ):
        path = Path(tmp) / "kv.bin"
        for size in sizes:
            write_s, read_s = [], []
            for _ in range(repeats):
                write_s.append(await _timed(_write(path, data[:size])))
                still_cached.append(_drop_cache(path))
                read_s.append(await _timed(_read(path, buffer[:size])))
                bar.update()
            writes.append(statistics.median(write_s))
            reads.append(statistics.median(read_s))
        # The largest file is in place: read it again while another file is being written.
        load = Path(tmp) / "concurrent-write.bin"
        with background_load(lambda: asyncio.run(_write(load, data))):
            read_s = []
            for _ in range(repeats):
                still_cached.append(_drop_cache(path))
                read_s.append(await _timed(_read(path, buffer)))
                bar.update()
    backends = ("aiofiles",) * len(sizes)
    series = [
        Series("disk", "disk read", True, tuple(sizes), tuple(reads), backends),
        Series("disk", "disk write + fsync", False, tuple(sizes), tuple(writes), backends),
    ]
    duplex = Timed("disk", "disk read during write + fsync", sizes[-1], statistics.median(read_s))
    notes = [
        f"disk tier: files in {directory}; {_method(still_cached)}; duplex: the "
        f"{sizes[-1]}-byte read while a second thread rewrites another file of that size"
    ]
    return DiskResult(series, [duplex], notes)


async def _timed(operation: Awaitable[None]) -> float:
    start = time.perf_counter()
    await operation
    return time.perf_counter() - start


async def _write(path: Path, data: memoryview) -> None:
    async with aiofiles.open(path, "wb") as f:
        for offset in range(0, len(data), CHUNK_BYTES):
            await f.write(data[offset : offset + CHUNK_BYTES])
        await f.flush()
        await asyncio.to_thread(os.fsync, f.fileno())


async def _read(path: Path, buffer: memoryview) -> None:
    async with aiofiles.open(path, "rb") as f:
        done = 0
        while done < len(buffer):
            n = await f.readinto(buffer[done : done + CHUNK_BYTES])
            if not n:
                raise ProfilingError(f"{path} is shorter than the {len(buffer)} bytes written")
            done += n


def _drop_cache(path: Path) -> float | None:
    """Drop the file's pages from the page cache; the share still cached (None: unknown)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return _cached_share(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _cached_share(fd: int, size: int) -> float | None:
    """Share of the file's pages in the page cache, by mincore on a mapping of it (Linux)."""
    if not sys.platform.startswith("linux") or size == 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        return None
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    try:
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            return None
    finally:
        libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(v & 1 for v in vector) / pages


def _method(still_cached: list[float | None]) -> str:
    if not hasattr(os, "posix_fadvise"):
        return "page cache NOT dropped (no posix_fadvise here): reads may come from memory"
    known = [share for share in still_cached if share is not None]
    if not known:
        return f"{_DROP} (not verified: mincore unavailable)"
    worst = max(known)
    if worst < 0.01:
        return f"{_DROP}; mincore: no page cached before any read"
    return (
        f"{_DROP}, but mincore found up to {worst:.0%} of the pages still cached before a "
        "read (tmpfs?): the read figure is partly a memory figure"
    )
