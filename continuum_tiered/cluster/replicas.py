"""The replicas of a cluster: ``continuum-tiered serve`` processes with the same model, flags
and policy, each with LMCache tiers of its own (CPU, and disk in a folder of its own) and,
behind them, the remote tier they all share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from continuum_tiered.core.server_process import ServerProcess, continuum_serve_command
from continuum_tiered.vllm.serve import is_cpu_build
from continuum_tiered.vllm.tiers import Tiers

OMP_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
GPU_ENV = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class ReplicaConfig:
    model: str
    serve_args: tuple[str, ...] = ()  # serve's own options and vLLM flags, in any order
    local_tiers: str | None = None  # cpu=SIZE[,disk=PATH:SIZE[:cleanup]]
    env: Mapping[str, str] = field(default_factory=dict)
    gpus_per_replica: int = 0  # replica i sees GPUs i*K .. i*K+K-1; 0: the devices as they are

    def check(self) -> None:
        """Fail before anything starts on tiers or devices no replica could run with."""
        if self.gpus_per_replica < 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        if self.local_tiers is not None:
            Tiers.parse(replica_tiers(self.local_tiers, 0, None) or "")


def replica_tiers(local: str | None, index: int, remote_url: str | None) -> str | None:
    """Replica ``index``'s ``--tiers``: the local tiers, with the disk tier in a folder of
    its own under the path given (two LMCache disk backends in one folder would write over
    each other's chunks), and the shared tier at ``remote_url`` behind them."""
    items = [item.strip() for item in (local or "").split(",") if item.strip()]
    tiers = []
    for item in items:
        name, _, value = item.partition("=")
        if name == "remote":
            raise ValueError(
                "--tiers: the cluster's remote tier is its own Redis (--shared-tier); "
                "give the replicas' local tiers only"
            )
        if name == "disk":
            path, sep, rest = value.partition(":")
            value = f"{Path(path) / f'replica-{index}'}{sep}{rest}"
        tiers.append(f"{name}={value}")
    if remote_url is not None:
        tiers.append(f"remote={remote_url}")
    return ",".join(tiers) or None


def device_binding(index: int, gpus_per_replica: int) -> dict[str, str]:
    """The devices of replica ``index``: with ``gpus_per_replica`` K, GPUs i*K .. i*K+K-1
    (``CUDA_VISIBLE_DEVICES``); on vLLM's CPU build, a core of its own for its worker's
    threads (round robin over this process's cores), where vLLM's automatic binding would
    put every replica's worker on the same core. Left as they are where the user set them."""
    if gpus_per_replica > 0:
        first = index * gpus_per_replica
        return {GPU_ENV: ",".join(str(g) for g in range(first, first + gpus_per_replica))}
    if not is_cpu_build() or OMP_BIND_ENV in os.environ:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {OMP_BIND_ENV: str(cores[index % len(cores)])}


def replica_server(
    config: ReplicaConfig, index: int, remote_url: str | None, log_dir: Path
) -> ServerProcess:
    """Replica ``index`` as a :class:`ServerProcess` (not started)."""
    tiers = replica_tiers(config.local_tiers, index, remote_url)
    if tiers is not None and (disk_dir := Tiers.parse(tiers).disk_dir) is not None:
        disk_dir.parent.mkdir(parents=True, exist_ok=True)  # serve checks it is there
    tier_args = ("--tiers", tiers) if tiers else ()
    command = continuum_serve_command(config.model, *config.serve_args, *tier_args)
    env = {**device_binding(index, config.gpus_per_replica), **config.env}
    return ServerProcess(command, log_dir / f"replica-{index}.log", env)
