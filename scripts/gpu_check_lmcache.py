"""LMCache's own connector storing and loading one prompt's KV, timed (scripts/gpu-check.sh).

Two LMCache engines as vLLM's worker builds them (``CreateGPUConnector`` for vLLM, then
``LMCacheEngineBuilder``): one with only its CPU tier, one whose CPU tier is a staging
buffer in front of its disk tier. Each stores a random paged KV cache of ``--tokens``
tokens in vLLM's layout (store = device -> tier) and loads it back into a zeroed cache
(load = tier -> device), checking that every byte came back. Writes a JSON of the times
and bandwidths. ``--device cpu`` runs the same path on vLLM's CPU layout with
continuum-tiered's CPU connector, so the script is testable without a GPU.

    python scripts/gpu_check_lmcache.py --config DIR/config.json --device cuda \
        --disk DIR --out lmcache.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from continuum_tiered.core.model_shapes import attention_dims
from continuum_tiered.core.profile import ModelShape

CHUNK = 256  # LMCache's default chunk_size, as serve --tiers configures it
BLOCK = {"cuda": 16, "cpu": 32}  # vLLM's default block size on each device


def kv_caches(config: dict[str, Any], tokens: int, device: str) -> list[torch.Tensor]:
    """Random bf16 KV in vLLM's paged layout for ``device``, one tensor per layer."""
    dims = attention_dims(config)
    layers, heads, head_dim = dims.num_layers, dims.num_kv_heads, dims.head_dim
    blocks = tokens // BLOCK[device]
    shape = (
        (2, blocks, BLOCK[device], heads, head_dim)  # flash attention's
        if device == "cuda"
        else (blocks, heads, BLOCK[device], 2 * head_dim)  # the CPU attention's
    )
    gen = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(shape, generator=gen, dtype=torch.float32, device=device).to(torch.bfloat16)
        for _ in range(layers)
    ]


def build_engine(name: str, lmcache_config: dict[str, Any], config: dict[str, Any]) -> Any:
    from lmcache.utils import EngineType
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.gpu_connector import CreateGPUConnector
    from lmcache.v1.metadata import LMCacheMetadata

    engine_config = LMCacheEngineConfig.from_dict(
        {"chunk_size": CHUNK, "pre_caching_hash_algorithm": "sha256_cbor", **lmcache_config}
    )
    dims = attention_dims(config)
    shape = (dims.num_layers, 2, CHUNK, dims.num_kv_heads, dims.head_dim)
    metadata = LMCacheMetadata(
        model_name=name,
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=torch.bfloat16,
        kv_shape=shape,
        chunk_size=CHUNK,
    )
    connector = CreateGPUConnector(engine_config, metadata, EngineType.VLLM)
    engine = LMCacheEngineBuilder.get_or_create(
        name, engine_config, metadata, connector, lambda t, _r: t, lambda o, _r: o
    )
    engine.post_init()  # builds the storage tiers, as vLLM's LMCache connector does
    return engine


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, work: Callable[[], object]) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = work()
    synchronize(device)
    return time.perf_counter() - start, result


def wait_for_disk(engine: Any, directory: Path, timeout_s: float = 120.0) -> None:
    """LMCache writes to disk behind the store call; wait until its writer is idle."""
    deadline = time.monotonic() + timeout_s
    backends = engine.storage_manager.storage_backends.values()
    while time.monotonic() < deadline:
        busy = [b for b in backends if getattr(getattr(b, "disk_worker", None), "put_tasks", ())]
        if not busy and any(directory.rglob("*")):
            return
        time.sleep(0.01)
    raise TimeoutError(f"LMCache wrote nothing to {directory} within {timeout_s:.0f} s")


def round_trip(
    label: str, lmcache_config: dict[str, Any], config: dict[str, Any], args: argparse.Namespace
) -> dict[str, float]:
    from lmcache.v1.cache_engine import LMCacheEngineBuilder

    source = kv_caches(config, args.tokens, args.device)
    nbytes = sum(t.numel() * t.element_size() for t in source)
    tokens = list(range(args.tokens))
    slots = torch.arange(args.tokens, dtype=torch.long, device=args.device)
    engine = build_engine(f"gpu-check-{label}", lmcache_config, config)
    try:
        # Warm-up on other tokens (one chunk): first-call allocations and kernel loads.
        warm = list(range(10**6, 10**6 + CHUNK))
        engine.store(warm, kvcaches=source, slot_mapping=slots[:CHUNK])
        engine.retrieve(
            warm, kvcaches=[torch.zeros_like(t) for t in source], slot_mapping=slots[:CHUNK]
        )
        store_s, _ = timed(
            args.device, lambda: engine.store(tokens, kvcaches=source, slot_mapping=slots)
        )
        if label == "disk":
            started = time.perf_counter()
            wait_for_disk(engine, args.disk)
            store_s += time.perf_counter() - started
        target = [torch.zeros_like(t) for t in source]
        load_s, mask = timed(
            args.device, lambda: engine.retrieve(tokens, kvcaches=target, slot_mapping=slots)
        )
        loaded = int(torch.as_tensor(mask).sum())
        if loaded != args.tokens:
            raise RuntimeError(f"{label}: LMCache loaded {loaded} of {args.tokens} tokens")
        if not all(torch.equal(a, b) for a, b in zip(source, target, strict=True)):
            raise RuntimeError(f"{label}: the KV LMCache loaded differs from what it stored")
    finally:
        LMCacheEngineBuilder.destroy(f"gpu-check-{label}")
    return {
        "bytes": nbytes,
        "store_s": store_s,
        "load_s": load_s,
        "store_gb_per_s": nbytes / store_s / 1e9,
        "load_gb_per_s": nbytes / load_s / 1e9,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="model config.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--disk", type=Path, required=True, help="directory for the disk tier")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.tokens % CHUNK or args.tokens % BLOCK[args.device]:
        parser.error(f"--tokens must be a multiple of {CHUNK} and {BLOCK[args.device]}")
    if args.device == "cpu":
        from continuum_tiered.vllm.lmcache.cpu_build import install

        install()
    config = json.loads(args.config.read_text())
    kv_bytes = args.tokens * ModelShape.from_hf_config(config).kv_bytes_per_token
    gib = 2 * kv_bytes / 2**30  # twice the prompt's bf16 KV
    cpu_only = {"local_cpu": True, "max_local_cpu_size": max(1.0, gib)}
    shutil.rmtree(args.disk, ignore_errors=True)
    args.disk.mkdir(parents=True)
    disk = {
        "local_cpu": False,
        "max_local_cpu_size": max(1.0, gib),
        "local_disk": f"file://{args.disk.resolve()}",
        "max_local_disk_size": max(1.0, gib),
    }
    results = {
        "device": args.device,
        "tokens": args.tokens,
        "model": config.get("_name_or_path", str(args.config)),
        "cpu": round_trip("cpu", cpu_only, config, args),
        "disk": round_trip("disk", disk, config, args),
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for tier in ("cpu", "disk"):
        r = results[tier]
        print(
            f"lmcache {tier}: {r['bytes'] / 2**20:.0f} MiB, store {r['store_gb_per_s']:.2f} GB/s"
            f" ({r['store_s'] * 1e3:.1f} ms), load {r['load_gb_per_s']:.2f} GB/s"
            f" ({r['load_s'] * 1e3:.1f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
