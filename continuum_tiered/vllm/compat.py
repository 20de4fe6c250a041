"""The vLLM and LMCache versions this plugin was checked against, and their private API it uses.

The connectors rely on more than vLLM's documented connector hooks: a few private
attributes and hooks that vLLM calls only when they exist, and LMCache's internals (its
storage manager, its disk backend). A version that renames one would not always fail; the
feature would silently go (a vLLM that never calls ``on_new_request`` just loses program
FCFS bookkeeping). So:

- every read of a private vLLM or LMCache attribute goes through a function here, and the
  names are listed (``VLLM_PRIVATE_API``, ``LMCACHE_PRIVATE_API``);
- ``check_vllm`` runs when the scheduler-side ``ContinuumConnector`` is built: the installed
  vLLM must be one the version matrix (``scripts/run-matrix.sh``) passed on, with every
  name still there. ``CONTINUUM_TIERED_ALLOW_UNTESTED_VLLM=1`` turns the version check into
  a warning (the names are still checked);
- ``check_lmcache`` runs before LMCache's internals are touched (the CPU build's connector,
  the tiered connector's tier lookups and disk-write guard): the installed LMCache must be
  one of ``CHECKED_LMCACHE``, with every name still there.

Either raises :class:`CompatError`, naming the version and the versions checked, or the
names missing. LMCache is imported only by ``check_lmcache`` and the accessors: on vLLM's
CPU build it must not be imported before its connector is built (``vllm.plugin``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector

logger = logging.getLogger(__name__)

CHECKED_VLLM = ("0.32", "0.33")  # major.minor, as run by scripts/run-matrix.sh
CHECKED_LMCACHE = ("0.5.6",)  # exact versions: the disk-write guard mirrors its bookkeeping
ALLOW_UNTESTED = "CONTINUUM_TIERED_ALLOW_UNTESTED_VLLM"


class CompatError(RuntimeError):
    pass


@dataclass(frozen=True)
class PrivateName:
    module: str
    owner: str
    name: str
    why: str

    def present(self) -> bool:
        """A class attribute, or an instance attribute its constructor assigns."""
        try:
            owner = getattr(importlib.import_module(self.module), self.owner)
        except (ImportError, AttributeError):
            return False
        if hasattr(owner, self.name):
            return True
        try:
            source = inspect.getsource(owner.__init__)
        except (OSError, TypeError):
            return False
        return re.search(rf"self\.{re.escape(self.name)}\s*[:=]", source) is not None

    def __str__(self) -> str:
        return f"{self.module}.{self.owner}.{self.name} ({self.why})"


_CONNECTOR = "vllm.distributed.kv_transfer.kv_connector.v1.base"
_MULTI = "vllm.distributed.kv_transfer.kv_connector.v1.multi_connector"
VLLM_PRIVATE_API = (
    PrivateName(
        "vllm.distributed.kv_transfer.kv_connector.factory",
        "KVConnectorFactory",
        "_registry",
        "the plugin registers LMCache's connector for the CPU build",
    ),
    PrivateName(
        _MULTI,
        "MultiConnector",
        "sub_connectors",
        "the tiered connector and the replay find their sub-connectors (public, since 0.32)",
    ),
    PrivateName(
        _MULTI,
        "MultiConnector",
        "_requests_to_connector",
        "the tiered connector declines a load LMCache offered",
    ),
    PrivateName(
        _CONNECTOR,
        "KVConnectorBase_V1",
        "_get_connector_metadata",
        "the tiered connector's worker half reads LMCache's requests",
    ),
    PrivateName(
        _CONNECTOR,
        "KVConnectorBase_V1",
        "_kv_transfer_config",
        "the tiered connector reads the LMCache child's tier sizes",
    ),
    PrivateName(_CONNECTOR, "KVConnectorBase_V1", "on_new_request", "program bookkeeping"),
    PrivateName(_CONNECTOR, "KVConnectorBase_V1", "has_pending_block_frees", "pressure fallback"),
    PrivateName(
        "vllm.v1.core.kv_cache_coordinator",
        "KVCacheCoordinator",
        "find_longest_cache_hit",
        "admission estimate: the local prefix hit",
    ),
    PrivateName(
        "vllm.v1.core.block_pool",
        "BlockPool",
        "reset_prefix_cache",
        "pins are dropped before a prefix-cache reset",
    ),
    PrivateName(
        "vllm.config", "VllmConfig", "max_concurrent_batches", "deferred frees under async"
    ),
)


_DISK_BACKEND = "lmcache.v1.storage_backend.local_disk_backend"
LMCACHE_PRIVATE_API = (
    PrivateName(
        "lmcache.v1.storage_backend.storage_manager",
        "StorageManager",
        "batched_contains",
        "tier lookups",
    ),
    PrivateName(_DISK_BACKEND, "LocalDiskBackend", "_key_to_path", "disk-write guard"),
    PrivateName(_DISK_BACKEND, "LocalDiskBackend", "async_save_bytes_to_disk", "disk-write guard"),
)


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def lmcache_version() -> str:
    return importlib.metadata.version("lmcache")


def is_checked(version: str, checked: Iterable[str] = CHECKED_VLLM) -> bool:
    return any(version == c or version.startswith(f"{c}.") for c in checked)


def missing_private_api(names: Iterable[PrivateName] = VLLM_PRIVATE_API) -> list[PrivateName]:
    return [n for n in names if not n.present()]


@cache
def _missing_in_installed(names: tuple[PrivateName, ...]) -> tuple[PrivateName, ...]:
    return tuple(missing_private_api(names))  # reads the sources: once per process


def check_vllm(version: str | None = None) -> None:
    """Raise :class:`CompatError` on a vLLM outside the matrix or one that lacks a name
    the plugin relies on."""
    version = version or vllm_version()
    if not is_checked(version):
        message = (
            f"continuum-tiered was checked against vLLM {', '.join(CHECKED_VLLM)} "
            f"(scripts/run-matrix.sh); this is vLLM {version}"
        )
        if os.environ.get(ALLOW_UNTESTED) != "1":
            raise CompatError(f"{message}. Set {ALLOW_UNTESTED}=1 to run it anyway.")
        logger.warning("%s; running anyway (%s=1)", message, ALLOW_UNTESTED)
    _refuse_missing(f"vLLM {version}", VLLM_PRIVATE_API)


def check_lmcache(version: str | None = None) -> None:
    """Raise :class:`CompatError` on an LMCache outside ``CHECKED_LMCACHE`` or one that
    lacks a name the plugin relies on. There is no override: what runs on LMCache's
    internals (the disk-write guard above all) mirrors the checked versions exactly."""
    version = version or lmcache_version()
    if version not in CHECKED_LMCACHE:
        raise CompatError(
            f"continuum-tiered was checked against LMCache {', '.join(CHECKED_LMCACHE)}; "
            f"this is LMCache {version}"
        )
    _refuse_missing(f"LMCache {version}", LMCACHE_PRIVATE_API)


def _refuse_missing(what: str, names: tuple[PrivateName, ...]) -> None:
    missing = _missing_in_installed(names)
    if missing:
        listed = "; ".join(str(n) for n in missing)
        raise CompatError(f"{what} lacks what continuum-tiered relies on: {listed}")


# ------------------------------------------------------------------ the accessors


def connector_registry() -> dict[str, Any]:
    """vLLM's connector factory's registry: name -> loader of the connector class."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    return KVConnectorFactory._registry


def multi_connector_routes(connector: MultiConnector) -> dict[str, int]:
    """``MultiConnector``'s request id -> index of the child whose lookup found its prefix.
    The live map: a request removed from it is loaded by no child."""
    return connector._requests_to_connector


def connector_metadata(connector: KVConnectorBase_V1) -> KVConnectorMetadata:
    """The metadata the scheduler sent ``connector`` for this step (worker side)."""
    return connector._get_connector_metadata()


def own_kv_transfer_config(connector: KVConnectorBase_V1) -> KVTransferConfig:
    """The config ``connector`` was built with: a ``MultiConnector`` child's own."""
    return connector._kv_transfer_config


def lmcache_disk_path(backend: Any, key: Any) -> str:
    """Where LMCache's ``LocalDiskBackend`` keeps the file of chunk ``key``."""
    return backend._key_to_path(key)
