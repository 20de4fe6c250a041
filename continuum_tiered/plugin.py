"""vLLM general plugin: makes our connectors resolvable by name in ``--kv-transfer-config``.

vLLM calls ``register`` in every process it starts (API server, engine core, workers)
through the ``vllm.general_plugins`` entry point declared in pyproject.toml.

- ``ContinuumConnector``: TTL pins only.
- ``ContinuumTieredConnector``: a ``MultiConnector`` of ``ContinuumConnector`` and LMCache's
  connector, with LMCache's tiers wired into the TTLs and stats (``continuum-tiered serve
  --tiers`` writes its config).
"""

from __future__ import annotations

import contextlib

CONNECTOR_NAME = "ContinuumConnector"
CONNECTOR_MODULE = "continuum_tiered.connectors.continuum"
TIERED_CONNECTOR_NAME = "ContinuumTieredConnector"
TIERED_CONNECTOR_MODULE = "continuum_tiered.connectors.tiered"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name, module in (
        (CONNECTOR_NAME, CONNECTOR_MODULE),
        (TIERED_CONNECTOR_NAME, TIERED_CONNECTOR_MODULE),
    ):
        # A second call in the same process finds it registered: plugins may load twice.
        with contextlib.suppress(ValueError):
            KVConnectorFactory.register_connector(name, module, name)
