"""The systems compared in the virtual-time replay, each as a configuration of one engine.

| name | queue order | KV across a tool call |
|---|---|---|
| ``vllm`` | request FCFS | freed on finish (LRU prefix cache) |
| ``autellix`` | program-level least attained service (PLAS) | freed on finish |
| ``static-ttl`` | program FCFS | pinned 2 s (Continuum's public code) |
| ``continuum`` | program FCFS | pinned for the cost-model TTL (our connector) |
| ``oracle`` | program FCFS | never lost: GPU KV large enough for every program |

Autellix's priority is the program's attained service when the request arrives (vLLM
fixes a request's priority on arrival): GPU seconds of the steps the program took part in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from continuum_tiered.plugin import CONNECTOR_NAME
from continuum_tiered.sim.engine import EngineHooks, ProgramRun


def _program_fcfs(run: ProgramRun) -> int:
    return run.seq


def _least_attained_service(run: ProgramRun) -> int:
    return int(run.attained_s * 1e6)


def _connector(policy: str, **options: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {"policy": policy}
    if options:
        extra["policy_options"] = options
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


@dataclass(frozen=True)
class Peer:
    name: str
    scheduling_policy: str = "fcfs"
    hooks: EngineHooks = field(default_factory=EngineHooks)
    kv_transfer_config: dict[str, Any] | None = None
    unlimited_kv: bool = False

    def with_profile(self, profile_path: str | None) -> dict[str, Any] | None:
        """The connector config, pointed at the tier profile the replay uses."""
        if self.kv_transfer_config is None or profile_path is None:
            return self.kv_transfer_config
        extra = {**self.kv_transfer_config["kv_connector_extra_config"], "profile": profile_path}
        return {**self.kv_transfer_config, "kv_connector_extra_config": extra}


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("vllm"),
        Peer(
            "autellix",
            scheduling_policy="priority",
            hooks=EngineHooks(priority=_least_attained_service),
        ),
        Peer(
            "static-ttl",
            scheduling_policy="priority",
            hooks=EngineHooks(priority=_program_fcfs, send_hints=True),
            kv_transfer_config=_connector("static-ttl", ttl_s=2.0),
        ),
        Peer(
            "continuum",
            scheduling_policy="priority",
            hooks=EngineHooks(priority=_program_fcfs, send_hints=True),
            kv_transfer_config=_connector("continuum"),
        ),
        Peer(
            "oracle",
            scheduling_policy="priority",
            hooks=EngineHooks(priority=_program_fcfs),
            unlimited_kv=True,
        ),
    )
}


def get_peer(name: str) -> Peer:
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(PEERS)}") from None
