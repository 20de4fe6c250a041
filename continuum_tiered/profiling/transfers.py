"""Copy bandwidth between the device's KV pool and host memory (the "cpu" tier).

On CUDA: host->device (reload) and device->host (offload), from pinned and from pageable
host memory, with torch and, when it imports, CuPy; each point keeps the faster library.
Then, at half the largest size, each direction between pinned memory and the device on
its own stream while the other direction runs on another (the duplex figure).
On the CPU build the KV pool is itself host memory, so a reload from the CPU tier is a
memcpy between two host tensors, and so is an offload; the duplex figure times each
while the other runs in a second thread.

Apart from the tier, one thread's host memcpy: what a buffered disk read or write costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from tqdm import tqdm

from continuum_tiered.profiling.measure import (
    ProfilingError,
    Series,
    Timed,
    available_host_bytes,
    background_load,
    median_seconds,
)

Copy = Callable[[int], object]  # copies the first n bytes
HOST_MEMCPY_BYTES = 256 << 20  # well past the CPU caches


@dataclass(frozen=True)
class TransferResult:
    series: list[Series]
    duplex: list[Timed]  # each direction of the largest copy while the other runs
    notes: list[str]  # how it was measured, for the profile's source and the summary


@dataclass(frozen=True)
class Direction:
    """One direction of a copy: ``start`` issues it, ``wait`` returns once it is done."""

    label: str
    start: Callable[[], object]
    wait: Callable[[], None]

    def run(self) -> None:
        self.start()
        self.wait()


def measure_transfers(device: str, sizes: list[int], repeats: int) -> TransferResult:
    if device == "cpu":
        return _measure_host(sizes, repeats)
    if not torch.cuda.is_available():
        raise ProfilingError(f"CUDA copies: torch {torch.__version__} sees no CUDA GPU")
    result = _measure_cuda(sizes, repeats)
    # Give the buffers back (torch's and CuPy's caches would keep them) before the model loads.
    torch.cuda.empty_cache()
    cupy = _import_cupy()
    if cupy is not None:
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    return result


def measure_host_memcpy(repeats: int) -> Timed:
    """One thread copying a buffer larger than the CPU caches (numpy copies in the caller's
    thread, where torch would spread the copy over its threads)."""
    n = int(min(HOST_MEMCPY_BYTES, available_host_bytes() // 8))
    src, dst = np.ones(n, dtype=np.uint8), np.ones(n, dtype=np.uint8)  # pages faulted in now
    seconds = median_seconds(lambda: np.copyto(dst, src), _no_sync, repeats)
    return Timed("host", "memcpy, one thread (numpy)", n, seconds)


def time_both_directions(
    tier: str, load: Direction, store: Direction, nbytes: int, repeats: int
) -> list[Timed]:
    """Each direction timed while the other runs over and over in a second thread."""
    timed = []
    for this, other in ((load, store), (store, load)):
        with background_load(other.run):
            seconds = median_seconds(this.start, this.wait, repeats)
        timed.append(Timed(tier, f"{this.label} during {other.label}", nbytes, seconds))
    return timed


def _measure_host(sizes: list[int], repeats: int) -> TransferResult:
    # ones, not empty: fault the pages in now
    pool, host = torch.ones(sizes[-1], dtype=torch.uint8), torch.ones(sizes[-1], dtype=torch.uint8)
    series = [
        _host_series("host memcpy", True, pool, host, sizes, repeats),
        _host_series("host memcpy (store)", False, host, pool, sizes, repeats),
    ]
    half = sizes[-1] // 2
    load = Direction("host->pool", lambda: pool[:half].copy_(host[:half]), _no_sync)
    store = Direction(
        "pool->host", lambda: host[half : 2 * half].copy_(pool[half : 2 * half]), _no_sync
    )
    duplex = time_both_directions("cpu", load, store, half, repeats)
    notes = [
        "cpu tier: the KV pool of the CPU build is host memory, so a reload or an offload is "
        f"a memcpy between two host tensors (torch, {torch.get_num_threads()} thread(s)); "
        f"duplex: {half} bytes each way, each direction timed while a second thread copies "
        "the other way"
    ]
    return TransferResult(series, duplex, notes)


def _host_series(
    label: str, reload: bool, dst: torch.Tensor, src: torch.Tensor, sizes: list[int], repeats: int
) -> Series:
    times = [
        median_seconds(lambda n=n: dst[:n].copy_(src[:n]), _no_sync, repeats)
        for n in tqdm(sizes, desc=f"cpu tier ({label})", unit="size")
    ]
    return Series("cpu", label, reload, tuple(sizes), tuple(times), ("torch",) * len(sizes))


def _no_sync() -> None:
    pass


def _measure_cuda(sizes: list[int], repeats: int) -> TransferResult:
    n = sizes[-1]
    device_buf = torch.empty(n, dtype=torch.uint8, device="cuda")
    start = time.perf_counter()
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    torch_pin_s = time.perf_counter() - start
    hosts = {"pinned": pinned, "pageable": torch.ones(n, dtype=torch.uint8)}
    copies: dict[tuple[str, bool], dict[str, Copy]] = {}
    for memory, host in hosts.items():
        copies[memory, True] = {"torch": _torch_copy(device_buf, host)}
        copies[memory, False] = {"torch": _torch_copy(host, device_buf)}
    notes = [f"pinned allocation of {n / 2**20:.0f} MiB: torch {torch_pin_s:.3f} s"]
    cupy = _import_cupy()
    if cupy is None:
        notes.append("CuPy not installed: torch copies only")
    else:
        cupy_copies, cupy_pin_s = _cupy_copies(cupy, device_buf, hosts["pageable"])
        for key, copy in cupy_copies.items():
            copies[key]["cupy"] = copy
        notes[0] += f", cupy {cupy_pin_s:.3f} s"

    bar = tqdm(total=len(copies) * len(sizes), desc="cpu tier (copies)", unit="size")
    series = []
    for (memory, reload), by_backend in copies.items():
        times, backends = [], []
        for size in sizes:
            # Keep the faster library at each size.
            t, backend = min(
                (median_seconds(lambda c=c, n=size: c(n), torch.cuda.synchronize, repeats), name)
                for name, c in by_backend.items()
            )
            times.append(t)
            backends.append(backend)
            bar.update()
        label = f"{memory} " + ("host->device" if reload else "device->host")
        series.append(Series("cpu", label, reload, tuple(sizes), tuple(times), tuple(backends)))
    bar.close()
    duplex = _cuda_duplex(device_buf, pinned, repeats)
    notes.append(
        f"duplex: {duplex[0].nbytes} bytes each way between pinned memory and the device "
        "(torch), each direction on its own CUDA stream, timed while a second thread keeps "
        "the other direction busy on another stream"
    )
    return TransferResult(series, duplex, notes)


def _cuda_duplex(device_buf: torch.Tensor, pinned: torch.Tensor, repeats: int) -> list[Timed]:
    """Host->device into the buffer's first half while device->host leaves its second."""
    half = device_buf.numel() // 2
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def copy(stream: torch.cuda.Stream, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(stream):  # the current stream is per thread: set it here
            dst.copy_(src, non_blocking=True)

    load = Direction(
        "pinned host->device",
        lambda: copy(streams[0], device_buf[:half], pinned[:half]),
        streams[0].synchronize,
    )
    store = Direction(
        "device->pinned host",
        lambda: copy(streams[1], pinned[half : 2 * half], device_buf[half : 2 * half]),
        streams[1].synchronize,
    )
    return time_both_directions("cpu", load, store, half, repeats)


def _torch_copy(dst: torch.Tensor, src: torch.Tensor) -> Copy:
    return lambda n: dst[:n].copy_(src[:n], non_blocking=True)


def _import_cupy() -> ModuleType | None:
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _cupy_copies(
    cupy: ModuleType, device_buf: torch.Tensor, pageable: torch.Tensor
) -> tuple[dict[tuple[str, bool], Copy], float]:
    """CuPy copies over the same device buffer, from its own pinned buffer and torch's pageable."""
    import cupyx
    import numpy as np

    dev = cupy.asarray(device_buf)  # shares the memory (__cuda_array_interface__)
    start = time.perf_counter()
    pinned = cupyx.empty_pinned(device_buf.numel(), dtype=np.uint8)
    pinned.fill(1)
    pin_s = time.perf_counter() - start
    copies: dict[tuple[str, bool], Copy] = {}
    for memory, host in (("pinned", pinned), ("pageable", pageable.numpy())):
        copies[memory, True] = lambda n, h=host: dev[:n].set(h[:n])
        copies[memory, False] = lambda n, h=host: dev[:n].get(out=h[:n])
    return copies, pin_s
