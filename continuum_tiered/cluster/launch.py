"""One cluster on one machine: Redis (the shared tier), N replicas, and vLLM's router in
front, started in that order and stopped in the reverse one.

A part that fails to start stops every part started before it, and the error names the
part. Replicas start at once (each is a process group of its own) and are waited for
together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from continuum_tiered.cluster.redis_server import RedisServer
from continuum_tiered.cluster.replicas import ReplicaConfig, replica_server
from continuum_tiered.cluster.router import ROUTER_POLICIES, router_server
from continuum_tiered.core.net import port_is_free
from continuum_tiered.core.server_process import ServerProcess, StartStop


class ClusterError(ValueError):
    """A part of the cluster failed (``part``: ``redis``, ``replica N`` or ``router``)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part


@dataclass(frozen=True)
class ClusterConfig:
    replicas: int
    replica: ReplicaConfig
    shared_tier: bool = True  # Redis behind every replica's local tiers
    router_policy: str = "consistent_hash"
    port: int | None = None  # the router's; a free one unless given
    redis_maxmemory: str = "1gb"
    startup_timeout_s: float = 300.0

    def check(self) -> None:
        """Fail before anything starts."""
        if self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.router_policy not in ROUTER_POLICIES:
            known = ", ".join(ROUTER_POLICIES)
            raise ValueError(f"router policy {self.router_policy!r}: expected one of {known}")
        if self.shared_tier and not self.replica.local_tiers:
            raise ValueError("the shared tier needs local tiers below the pins: --tiers cpu=SIZE")
        if self.port is not None and not port_is_free(self.port):
            raise ClusterError("router", f"port {self.port} is in use")
        self.replica.check()


Progress = Callable[[str], None]


class Cluster(StartStop):
    """``with Cluster(config, workdir) as cluster: cluster.url``; logs in ``workdir/logs``."""

    def __init__(self, config: ClusterConfig, workdir: Path, progress: Progress = print):
        self.config = config
        self.workdir = workdir
        self.progress = progress
        self.redis: RedisServer | None = None
        self.replicas: list[ServerProcess] = []
        self.router: ServerProcess | None = None

    @property
    def url(self) -> str:
        assert self.router is not None, "start() first"
        return self.router.url

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self) -> Cluster:
        self.config.check()
        try:
            self._start_parts()
        except BaseException:  # a signal while starting stops what started, too
            self.stop()
            raise
        return self

    def _start_parts(self) -> None:
        config = self.config
        self.logs.mkdir(parents=True, exist_ok=True)
        remote_url = None
        if config.shared_tier:
            with _part("redis"):
                self.progress("starting Redis (the shared KV tier) ...")
                self.redis = RedisServer(
                    maxmemory=config.redis_maxmemory, log=self.logs / "redis.log"
                )
                self.redis.start()
                remote_url = self.redis.url
                self.progress(f"Redis ready at {remote_url}")
        for index in range(config.replicas):
            with _part(f"replica {index}"):
                replica = replica_server(config.replica, index, remote_url, self.logs)
                self.replicas.append(replica)
                self.progress(
                    f"starting replica {index} at {replica.url} (log: {replica.log_path})"
                )
                replica.launch()
        started = time.monotonic()
        for index, replica in enumerate(self.replicas):
            with _part(f"replica {index}"):
                replica.wait_ready(config.startup_timeout_s)
                self.progress(f"replica {index} ready ({time.monotonic() - started:.0f} s)")
        with _part("router"):
            urls = [replica.url for replica in self.replicas]
            self.router = router_server(
                urls, config.router_policy, self.logs / "router.log", config.port
            )
            self.progress(f"starting vllm-router ({config.router_policy}) ...")
            self.router.start(timeout_s=60)

    def wait(self, poll_s: float = 1.0) -> None:
        """Serve until the router exits (raises ClusterError); a replica that exits is
        reported once, and the router sends its programs to the others."""
        assert self.router is not None and self.router.process is not None, "start() first"
        reported: set[int] = set()
        while self.router.process.poll() is None:
            for index, replica in enumerate(self.replicas):
                if index not in reported and replica.process and replica.process.poll() is not None:
                    reported.add(index)
                    self.progress(
                        f"warning: replica {index} exited with code "
                        f"{replica.process.returncode} (log: {replica.log_path}); the router "
                        "sends its programs to the other replicas"
                    )
            time.sleep(poll_s)
        raise ClusterError("router", f"exited with code {self.router.process.returncode}")

    def stop(self) -> None:
        """Stop every part that started, the router first, Redis last."""
        if self.router is not None:
            self.router.stop()
        for replica in self.replicas:
            replica.stop()
        if self.redis is not None:
            self.redis.stop()


@contextmanager
def _part(name: str) -> Iterator[None]:
    """Errors while starting ``name`` become ClusterError naming it."""
    try:
        yield
    except ClusterError:
        raise
    except Exception as err:
        raise ClusterError(name, str(err)) from err
