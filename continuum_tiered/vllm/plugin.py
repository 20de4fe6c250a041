"""vLLM general plugin: makes our connectors resolvable by name in ``--kv-transfer-config``.

vLLM calls ``register`` in every process it starts (API server, engine core, workers)
through the ``vllm.general_plugins`` entry point declared in pyproject.toml.

- ``ContinuumConnector``: TTL pins only.
- ``ContinuumTieredConnector``: a ``MultiConnector`` of ``ContinuumConnector`` and LMCache's
  connector, with LMCache's tiers wired into the TTLs and stats (``continuum-tiered serve
  --tiers`` writes its config).
- vLLM's own ``LMCacheConnectorV1`` on the CPU build: see
  :func:`give_lmcache_the_cpu_connector`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

CONNECTOR_NAME = "ContinuumConnector"
CONNECTOR_MODULE = "continuum_tiered.vllm.connectors.continuum_connector"
TIERED_CONNECTOR_NAME = "ContinuumTieredConnector"
TIERED_CONNECTOR_MODULE = "continuum_tiered.vllm.connectors.tiered_connector"
LMCACHE_CONNECTOR_NAME = "LMCacheConnectorV1"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from continuum_tiered.vllm.compat import connector_registry

    for name, module in (
        (CONNECTOR_NAME, CONNECTOR_MODULE),
        (TIERED_CONNECTOR_NAME, TIERED_CONNECTOR_MODULE),
    ):
        # A second call in the same process finds it registered: plugins may load twice.
        with contextlib.suppress(ValueError):
            KVConnectorFactory.register_connector(name, module, name)
    give_lmcache_the_cpu_connector(connector_registry())
    log_through_vllm()


def log_through_vllm() -> None:
    """Send our loggers' records (``continuum_tiered.*``) to vLLM's handlers at its level:
    vLLM's logging config handles only the ``vllm`` logger, so our INFO lines (a disk tier
    removed at shutdown, say) would not reach the server log."""
    ours, theirs = logging.getLogger("continuum_tiered"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:  # done already, or vLLM's logging is off
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False


def give_lmcache_the_cpu_connector(registry: dict[str, Callable[[], Any]]) -> None:
    """Make a plain ``LMCacheConnectorV1`` config work on vLLM's CPU build.

    LMCache has no KV connector for CPU-only vLLM; ours is installed into it
    (:func:`continuum_tiered.vllm.lmcache.cpu_build.install`) when an ``LMCacheConnectorV1`` is
    constructed, not earlier: importing LMCache brings in llvmlite, whose objects break the
    CPU worker's Triton-kernel rebinding (a scan of ``sys.modules`` at worker start), so
    LMCache must not be imported before that. vLLM's factory has no public hook between
    looking a connector up and building it, hence the wrapped entry of its registry
    (``compat.connector_registry``); on other platforms the class is LMCache's own.
    """
    load = registry.get(LMCACHE_CONNECTOR_NAME)
    if load is None or getattr(load, "_continuum_cpu", False):
        return

    @functools.cache
    def load_for_platform() -> Any:
        from vllm.platforms import current_platform

        lmcache_connector = load()
        if not current_platform.is_cpu():
            return lmcache_connector

        class LMCacheConnectorV1(lmcache_connector):  # the same connector, same name
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                from continuum_tiered.vllm.lmcache.cpu_build import install

                install()
                super().__init__(*args, **kwargs)

        return LMCacheConnectorV1

    load_for_platform._continuum_cpu = True  # type: ignore[attr-defined]
    registry[LMCACHE_CONNECTOR_NAME] = load_for_platform
