"""``--tiers cpu=8GB,disk=/path:100GB,remote=redis://HOST:PORT``: LMCache's tiers below the
GPU, checked before vLLM starts.

Sizes are binary, as LMCache reads them (``8GB`` = 8 GiB); units B, K, M, G, T with an
optional ``B`` or ``iB``. A tier that cannot work fails here, naming the problem: an
unknown tier, a size larger than the free memory or disk, a disk path that cannot be
written, a Redis server that does not answer.

The remote tier is LMCache's remote backend on a Redis server that several replicas share
(docs/architecture.md, 'The remote tier'); its size is Redis's own (``maxmemory``).

The disk tier writes into its own subdirectory of the given path (``DISK_SUBDIR``), so that
``cleanup`` (``disk=/path:100GB:cleanup``) can remove exactly what it wrote when the server
shuts down, never the user's files.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

from continuum_tiered.core.remote_tier import (
    RemoteTierError,
    check_remote,
    parse_remote_url,
    with_timeouts,
)
from continuum_tiered.core.tier_model import LMCACHE_CHUNK_TOKENS, TIER_ORDER

GIB = 1024**3
DISK_SUBDIR = "continuum-lmcache"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)

# LMCache settings that are the same for every tier layout (see tier_config):
# - chunk_size 256: LMCache's default; a prefix is found in whole chunks.
# - save_decode_cache: a turn's generated tokens are stored too, so the next turn, whose
#   prompt repeats them, finds its whole prefix below the GPU.
# - pre_caching_hash_algorithm sha256_cbor: LMCache's default ("builtin") hashes with
#   Python's hash(), which differs between the scheduler and worker processes unless
#   PYTHONHASHSEED is fixed, so lookups would never hit.
LMCACHE_DEFAULTS: dict[str, object] = {
    "lmcache.chunk_size": LMCACHE_CHUNK_TOKENS,
    "lmcache.save_decode_cache": True,
    "lmcache.pre_caching_hash_algorithm": "sha256_cbor",
}


class TierSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Tiers:
    cpu_bytes: int = 0
    disk_dir: Path | None = None  # the tier's own directory, under the path given
    disk_bytes: int = 0
    disk_cleanup: bool = False
    remote_url: str | None = None  # redis://HOST:PORT, shared by replicas
    # LMCache's use_layerwise: layer i+1 loads while layer i computes, so a reload hides
    # behind the forward pass (what the replay's ``tiered`` assumes). GPU connectors only.
    layerwise: bool = False

    @classmethod
    def parse(cls, spec: str) -> Tiers:
        """``cpu=SIZE,disk=PATH:SIZE[:cleanup],remote=redis://HOST:PORT``; disk and
        remote may be left out."""
        fields: dict[str, object] = {}
        seen: set[str] = set()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            if not sep or not value:
                raise TierSpecError(f"--tiers: expected NAME=VALUE, got {item!r}")
            if name not in TIER_ORDER:
                known = ", ".join(TIER_ORDER)
                raise TierSpecError(f"--tiers: unknown tier {name!r}; known tiers: {known}")
            if name in seen:
                raise TierSpecError(f"--tiers: tier {name!r} given twice")
            seen.add(name)
            if name == "cpu":
                fields["cpu_bytes"] = parse_size(value, "cpu")
            elif name == "disk":
                path, size, cleanup = _split_disk(value)
                fields |= {
                    "disk_dir": Path(path).expanduser().absolute() / DISK_SUBDIR,
                    "disk_bytes": parse_size(size, "disk"),
                    "disk_cleanup": cleanup,
                }
            else:
                fields["remote_url"] = _remote(parse_remote_url, value)
        if not seen:
            raise TierSpecError("--tiers: no tier given")
        below = sorted(seen - {"cpu"})
        if below and "cpu" not in seen:
            raise TierSpecError(
                f"--tiers: the {below[0]} tier needs a cpu tier (LMCache stages {below[0]} "
                "reads and writes in its CPU memory)"
            )
        return cls(**fields)  # type: ignore[arg-type]

    def check(self) -> None:
        """Fail on a tier this machine cannot hold or reach."""
        available = psutil.virtual_memory().available
        if self.cpu_bytes > available:
            raise TierSpecError(
                f"--tiers: cpu={_gib(self.cpu_bytes)} is more than the {_gib(available)} of "
                "memory available"
            )
        if self.remote_url is not None:
            _remote(check_remote, self.remote_url)
        if self.disk_dir is not None:
            self._check_disk(self.disk_dir)

    def _check_disk(self, disk_dir: Path) -> None:
        parent = disk_dir.parent
        if not parent.is_dir():
            raise TierSpecError(f"--tiers: disk path {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TierSpecError(f"--tiers: disk path {parent} is not writable")
        free = shutil.disk_usage(parent).free
        if self.disk_bytes > free:
            raise TierSpecError(
                f"--tiers: disk={_gib(self.disk_bytes)} is more than the {_gib(free)} free "
                f"on {parent}"
            )

    def lmcache_config(self) -> dict[str, object]:
        """``lmcache.*`` keys for LMCache's ``kv_connector_extra_config``."""
        config = dict(LMCACHE_DEFAULTS)
        config["lmcache.local_cpu"] = True
        config["lmcache.max_local_cpu_size"] = self.cpu_bytes / GIB
        if self.layerwise:
            config["lmcache.use_layerwise"] = True
        if self.disk_dir is not None:
            config["lmcache.local_disk"] = f"file://{self.disk_dir}/"
            config["lmcache.max_local_disk_size"] = self.disk_bytes / GIB
        if self.remote_url is not None:
            # LMCache 0.5.6 reads remote_url (its RedisConnector for redis://) and writes
            # each chunk there as it writes the local tiers; "naive" serde: raw KV bytes.
            # The URL carries socket timeouts, so a frozen server cannot stall a step.
            config["lmcache.remote_url"] = with_timeouts(self.remote_url)
            config["lmcache.remote_serde"] = "naive"
        return config


def lmcache_tier_bytes(config: Mapping[str, object]) -> dict[str, float] | None:
    """Each configured tier's size in bytes from ``lmcache.*`` keys as ``lmcache_config``
    writes them (the remote tier's is Redis's, unknown here: infinite); None where LMCache
    is configured elsewhere (its own config file)."""
    cpu = config.get("lmcache.max_local_cpu_size")
    if not isinstance(cpu, int | float):
        return None
    sizes = {"cpu": cpu * GIB}
    disk = config.get("lmcache.max_local_disk_size", 0)
    if config.get("lmcache.local_disk") and isinstance(disk, int | float):
        sizes["disk"] = disk * GIB
    if config.get("lmcache.remote_url"):
        sizes["remote"] = math.inf
    return sizes


def parse_size(text: str, tier: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise TierSpecError(f"--tiers: {tier} size {text!r} is not a size like 8GB or 512MiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise TierSpecError(f"--tiers: {tier} size must be positive, got {text!r}")
    return size


def _split_disk(value: str) -> tuple[str, str, bool]:
    parts = value.split(":")
    cleanup = parts[-1] == "cleanup"
    if cleanup:
        parts = parts[:-1]
    if len(parts) != 2 or not parts[0]:
        raise TierSpecError(f"--tiers: disk expects PATH:SIZE[:cleanup], got {value!r}")
    return parts[0], parts[1], cleanup


def _remote(check: Callable[[str], object], url: str) -> str:
    try:
        check(url)
    except RemoteTierError as error:
        raise TierSpecError(f"--tiers: {error}") from None
    return url


def _gib(n: int) -> str:
    return f"{n / GIB:.3g} GiB"
