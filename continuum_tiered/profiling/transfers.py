"""Copy bandwidth between the device's KV pool and host memory (the "cpu" tier).

On CUDA: host->device (reload) and device->host (offload), from pinned and from pageable
host memory, with torch and, when it imports, CuPy; each point keeps the faster library.
On the CPU build the KV pool is itself host memory, so a reload from the CPU tier is a
memcpy between two host tensors, the same in both directions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from tqdm import tqdm

from continuum_tiered.profiling.measure import Series, median_seconds

Copy = Callable[[int], object]  # copies the first n bytes


@dataclass(frozen=True)
class TransferResult:
    series: list[Series]
    notes: list[str]  # how it was measured, for the profile's source and the summary


def measure_transfers(device: str, sizes: list[int], repeats: int) -> TransferResult:
    if device == "cpu":
        return _measure_host(sizes, repeats)
    result = _measure_cuda(sizes, repeats)
    # Give the buffers back (torch's and CuPy's caches would keep them) before the model loads.
    torch.cuda.empty_cache()
    cupy = _import_cupy()
    if cupy is not None:
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    return result


def _measure_host(sizes: list[int], repeats: int) -> TransferResult:
    src = torch.ones(sizes[-1], dtype=torch.uint8)  # ones, not empty: fault the pages in now
    dst = torch.ones(sizes[-1], dtype=torch.uint8)
    times = []
    for n in tqdm(sizes, desc="cpu tier (memcpy)", unit="size"):
        times.append(median_seconds(lambda n=n: dst[:n].copy_(src[:n]), _no_sync, repeats))
    series = Series("cpu", "host memcpy", True, tuple(sizes), tuple(times), ("torch",) * len(sizes))
    notes = [
        "cpu tier: the KV pool of the CPU build is host memory, so a reload is a memcpy "
        f"between two host tensors (torch, {torch.get_num_threads()} thread(s))"
    ]
    return TransferResult([series], notes)


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
    return TransferResult(series, notes)


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
