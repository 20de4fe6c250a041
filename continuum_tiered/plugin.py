"""vLLM general plugin: makes ``"kv_connector": "ContinuumConnector"`` resolvable by name.

vLLM calls ``register`` in every process it starts (API server, engine core, workers)
through the ``vllm.general_plugins`` entry point declared in pyproject.toml.
"""

from __future__ import annotations

import contextlib

CONNECTOR_NAME = "ContinuumConnector"
CONNECTOR_MODULE = "continuum_tiered.connectors.continuum"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    # A second call in the same process finds it registered: plugins may load twice.
    with contextlib.suppress(ValueError):
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
