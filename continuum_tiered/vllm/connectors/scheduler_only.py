"""Base for KV connectors that act only in the scheduler and move no KV themselves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)

if TYPE_CHECKING:
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput


@dataclass
class NoWorkerMetadata(KVConnectorMetadata):
    """Nothing crosses to the workers."""


class SchedulerOnlyConnector(KVConnectorBase_V1):
    """Worker hooks are no-ops and nothing has to be delivered before blocks are freed."""

    @property
    def requires_kv_delivery(self) -> bool:
        return False

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return NoWorkerMetadata()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any):
        return

    def wait_for_save(self) -> None:
        return
