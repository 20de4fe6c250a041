"""The vLLM versions this plugin was checked against, and the non-public vLLM API it uses.

The connector relies on more than vLLM's documented connector hooks: a few private
attributes and hooks that vLLM calls only when they exist. A vLLM that renames one would
not fail; the feature would silently go (a vLLM that never calls ``on_new_request`` just
loses program FCFS bookkeeping). So the scheduler-side connector checks at start that the
installed vLLM is one the version matrix (``scripts/run-matrix.sh``) passed on, and that
every name below is still there, and refuses to start otherwise, naming what is missing.
``CONTINUUM_TIERED_ALLOW_UNTESTED_VLLM=1`` turns the version check into a warning (the
names are still checked). LMCache's private API is gated where it is used
(``lmcache.cpu_build.lmcache_version_checked``: the CPU connector, the disk-write guard).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

logger = logging.getLogger(__name__)

CHECKED_VLLM = ("0.32", "0.33")  # major.minor, as run by scripts/run-matrix.sh
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
VLLM_PRIVATE_API = (
    PrivateName(
        "vllm.distributed.kv_transfer.kv_connector.factory",
        "KVConnectorFactory",
        "_registry",
        "the plugin registers LMCache's connector for the CPU build",
    ),
    PrivateName(
        "vllm.distributed.kv_transfer.kv_connector.v1.multi_connector",
        "MultiConnector",
        "_connectors",
        "the tiered connector and the replay find their sub-connectors",
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


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def is_checked(version: str, checked: Iterable[str] = CHECKED_VLLM) -> bool:
    return any(version == c or version.startswith(f"{c}.") for c in checked)


def missing_private_api(names: Iterable[PrivateName] = VLLM_PRIVATE_API) -> list[PrivateName]:
    return [n for n in names if not n.present()]


@cache
def _missing_in_installed_vllm() -> tuple[PrivateName, ...]:
    return tuple(missing_private_api())  # reads vLLM's sources: once per process


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
    missing = _missing_in_installed_vllm()
    if missing:
        listed = "; ".join(str(n) for n in missing)
        raise CompatError(f"vLLM {version} lacks what continuum-tiered relies on: {listed}")
