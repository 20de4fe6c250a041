"""vLLM general plugin: makes ``"kv_connector": "ContinuumConnector"`` resolvable by name.

vLLM calls ``register`` in every process it starts (API server, engine core, workers)
through the ``vllm.general_plugins`` entry point declared in pyproject.toml.
"""

from __future__ import annotations

CONNECTOR_NAME = "ContinuumConnector"
CONNECTOR_MODULE = "continuum_tiered.connectors.continuum"


def register() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    except ValueError:
        pass  # already registered in this process: plugins may be loaded more than once
