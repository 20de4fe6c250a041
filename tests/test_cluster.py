"""Many replicas on real parts: ``continuum-tiered cluster`` (two vLLM CPU replicas with the
plugin, vllm-router with consistent_hash, Redis as the shared tier), run as the command a
user runs, one cluster for the module. The tests that kill a replica and stop Redis run
after those that need both, and the last one stops the cluster with SIGINT."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from continuum_tiered.cli import main
from continuum_tiered.client.agent_program import AgentProgram
from continuum_tiered.cluster.launch import Cluster, ClusterConfig, ClusterError
from continuum_tiered.cluster.replicas import (
    GPU_ENV,
    OMP_BIND_ENV,
    ReplicaConfig,
    device_binding,
    replica_tiers,
)
from continuum_tiered.core.net import free_port, port_is_free
from continuum_tiered.core.server_process import prometheus_samples, tiny_engine_flags

STARTUP_TIMEOUT_S = 400  # two engines starting at once on two shared cores
REQUEST_TIMEOUT_S = 120  # a hung request fails the test instead of the suite
OUTPUT_TOKENS = 8
HANDOVERS = "vllm:continuum_pin_handovers_total"
REQUESTS = "vllm:request_success_total"
FROM_REMOTE = "vllm:continuum_prefix_tokens_from_remote_total"
FROM_RECOMPUTE = "vllm:continuum_prefix_tokens_from_recompute_total"


@dataclass
class RunningCluster:
    """The ``continuum-tiered cluster`` process and what it printed while starting."""

    process: subprocess.Popen[str]
    url: str = ""
    replicas: list[str] = field(default_factory=list)
    redis_url: str = ""
    lines: list[str] = field(default_factory=list)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def server_listening_on(self, url: str) -> psutil.Process:
        """The process started with ``--port`` of ``url`` (a replica's API server)."""
        port = url.rsplit(":", 1)[1]
        for child in self.descendants():
            cmdline = child.cmdline()
            if "--port" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
                return child
        raise AssertionError(f"no process serves {url}")

    def redis_process(self) -> psutil.Process:
        port = self.redis_url.rsplit(":", 1)[1]
        for child in self.descendants():
            if "redis-server" in child.name() and port in " ".join(child.cmdline()):
                return child
        raise AssertionError("no redis-server among the cluster's processes")

    def counters(self, prefix: str = "vllm:") -> list[dict[str, float]]:
        """Each live replica's counters (an empty dict for one that is gone)."""
        out = []
        for url in self.replicas:
            try:
                out.append(prometheus_samples(url, prefix))
            except OSError:
                out.append({})
        return out


def read_startup(cluster: RunningCluster) -> None:
    """Read the command's output until it prints its endpoint (or exits)."""
    assert cluster.process.stdout is not None
    for line in cluster.process.stdout:
        cluster.lines.append(line)
        if match := re.match(r"starting replica \d+ at (http://\S+)", line):
            cluster.replicas.append(match[1])
        elif match := re.match(r"Redis ready at (redis://\S+)", line):
            cluster.redis_url = match[1]
        elif match := re.match(r"continuum-tiered cluster: (http://\S+)", line):
            cluster.url = match[1]
            return


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[RunningCluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    command = [
        sys.executable, "-m", "continuum_tiered.cli", "cluster",
        "--replicas", "2", "--port", str(free_port()), "--kv-blocks", "128",
        "--tiers", "cpu=64MiB", "--workdir", str(workdir),
        # A pin outlives every tool call of the test: hand-overs are counted for sure.
        "--policy", "static-ttl", "--policy-option", "ttl_s=600",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = RunningCluster(process)
    reader = threading.Thread(target=read_startup, args=(running,), daemon=True)
    reader.start()
    reader.join(STARTUP_TIMEOUT_S)
    try:
        assert running.url, f"the cluster did not start:\n{''.join(running.lines)[-3000:]}"
        # Drain the rest of the output so the command never blocks on a full pipe.
        threading.Thread(target=lambda: running.lines.extend(process.stdout), daemon=True).start()
        yield running
    finally:
        leftovers = running.descendants() if process.poll() is None else []
        process.kill()
        process.wait()
        for child in leftovers:  # by pid: only what this cluster started
            if child.is_running():
                child.kill()


@dataclass
class Program:
    """One agent program replayed through the router: random prompts, greedy replies."""

    agent: AgentProgram
    seed: int
    prompt: list[int] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)

    def turn(self, url: str) -> None:
        rng = random.Random(f"{self.seed}:{len(self.outputs)}")
        new_tokens = 600 if not self.prompt else 40
        self.prompt += [rng.randrange(3, 500) for _ in range(new_tokens)]
        body = {
            "model": "tiny",
            "prompt": self.prompt,
            "max_tokens": OUTPUT_TOKENS,
            "temperature": 0.0,
            "seed": 0,
            "ignore_eos": True,
            "return_token_ids": True,
            **self.agent.extra_body(),
        }
        self.agent.turn += 1
        # Until the router's health check takes a killed replica off its ring (a few
        # seconds), requests hashed to it fail with 5xx; a client retries them, as the
        # replay's runner does.
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            response = httpx.post(
                f"{url}/v1/completions",
                json=body,
                headers=self.agent.routing_headers(),
                timeout=REQUEST_TIMEOUT_S,
            )
            if response.status_code < 500 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert response.status_code == 200, response.text
        reply = response.json()
        output = reply["choices"][0]["token_ids"]
        self.outputs.append(output)
        self.cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        self.prompt += output


def serving_replica(cluster: RunningCluster, program: Program) -> int:
    """Run the program's next turn; the replica whose request counter moved (exactly one)."""
    before = cluster.counters(REQUESTS)
    program.turn(cluster.url)
    after = cluster.counters(REQUESTS)
    moved = [
        i
        for i, (b, a) in enumerate(zip(before, after, strict=True))
        if a.get(REQUESTS) != b.get(REQUESTS)
    ]
    assert len(moved) == 1, f"request counters moved on replicas {moved}"
    return moved[0]


def wait_for(condition, what: str, timeout_s: float = 10.0) -> None:
    """The API server gets the engine's counters once per step: wait for them."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


# ------------------------------------------------------- no cluster: refusals up front


def test_a_taken_router_port_is_refused_before_anything_starts(capsys):
    before = psutil.Process().children(recursive=True)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["cluster", "--replicas", "1", "--port", str(port)]) == 2
    assert f"router: port {port} is in use" in capsys.readouterr().err
    assert psutil.Process().children(recursive=True) == before


def test_a_replica_that_never_comes_up_stops_the_others_and_is_named(tmp_path, tiny_model_dir):
    config = ClusterConfig(
        replicas=2,
        replica=ReplicaConfig(
            str(tiny_model_dir),
            ("--policy", "no-such-policy", *tiny_engine_flags(tiny_model_dir, 64)),
            local_tiers="cpu=64MiB",
        ),
    )
    cluster = Cluster(config, tmp_path, progress=lambda line: None)
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ClusterError) as failure:
        cluster.start()
    assert failure.value.part == "replica 0"
    assert "exited with code" in str(failure.value)
    assert cluster.redis is not None and not cluster.redis.is_up()  # started, then stopped
    assert psutil.Process().children(recursive=True) == before


def test_each_replica_gets_its_own_disk_folder_and_the_shared_tier():
    spec = replica_tiers("cpu=1GiB,disk=/data/kv:10GiB:cleanup", 3, "redis://10.0.0.5:6379")
    assert spec == "cpu=1GiB,disk=/data/kv/replica-3:10GiB:cleanup,remote=redis://10.0.0.5:6379"
    with pytest.raises(ValueError, match="remote tier is its own Redis"):
        replica_tiers("cpu=1GiB,remote=redis://elsewhere:6379", 0, None)


def test_each_replica_gets_devices_of_its_own(monkeypatch):
    assert device_binding(0, 2) == {GPU_ENV: "0,1"}
    assert device_binding(1, 2) == {GPU_ENV: "2,3"}
    monkeypatch.delenv(OMP_BIND_ENV, raising=False)
    cores = sorted(os.sched_getaffinity(0))
    bound = [device_binding(i, 0)[OMP_BIND_ENV] for i in range(len(cores))]  # CPU build
    assert bound == [str(c) for c in cores]
    monkeypatch.setenv(OMP_BIND_ENV, "0-1")
    assert device_binding(1, 0) == {}  # the user's binding stands
    with pytest.raises(ValueError, match="--gpus-per-replica"):
        ReplicaConfig("m", gpus_per_replica=-1).check()


# ------------------------------------------------------------- one cluster, two replicas


def test_every_turn_of_a_program_reaches_one_replica_and_programs_spread(cluster):
    assert len(cluster.replicas) == 2 and cluster.redis_url
    homes: dict[int, list[int]] = {}
    handovers_before = cluster.counters(HANDOVERS)
    programs = []
    for seed in range(20):  # until both replicas hold a program; two such suffice
        program = Program(AgentProgram(f"spread-{seed}"), seed)
        programs.append(program)
        homes[seed] = [serving_replica(cluster, program)]
        if len({h[0] for h in homes.values()}) == 2 and len(homes) >= 3:
            break
    assert len({h[0] for h in homes.values()}) == 2, f"every program on one replica: {homes}"
    for program in programs:
        for _ in range(2):
            homes[program.seed].append(serving_replica(cluster, program))
    assert all(len(set(h)) == 1 for h in homes.values()), homes
    # Each program's second and third turns took over its pin on its own replica only.
    per_replica = [sum(2 for h in homes.values() if h[0] == i) for i in range(2)]

    def handed_over() -> list[float]:
        return [
            a[HANDOVERS] - b[HANDOVERS]
            for a, b in zip(cluster.counters(HANDOVERS), handovers_before, strict=True)
        ]

    wait_for(lambda: handed_over() == per_replica, f"hand-overs {handed_over()} != {per_replica}")
    assert all(p.cached[1] > 0 and p.cached[2] > 0 for p in programs)


def test_a_program_on_a_killed_replica_completes_on_the_other_with_the_same_output(cluster):
    """Six programs interleaved (LMCache's cross-request contamination bugs show with many,
    not one). After three turns the replica of the first one dies; the fourth turn of every
    program runs on the survivor, those that moved with their prefix from Redis. An
    uninterrupted run of the same prompts under other program ids gives the same greedy
    tokens on every turn."""
    programs = [Program(AgentProgram(f"failover-{seed}"), 100 + seed) for seed in range(6)]
    with ThreadPoolExecutor(len(programs)) as pool:
        for _ in range(2):
            list(pool.map(lambda p: p.turn(cluster.url), programs))
    homes = [serving_replica(cluster, program) for program in programs]
    victim = homes[0]
    survivor = 1 - victim
    moved = [p for p, home in zip(programs, homes, strict=True) if home == victim]

    os.killpg(cluster.server_listening_on(cluster.replicas[victim]).pid, signal.SIGKILL)
    remote_before = cluster.counters(FROM_REMOTE)[survivor][FROM_REMOTE]
    with ThreadPoolExecutor(len(programs)) as pool:
        list(pool.map(lambda p: p.turn(cluster.url), programs))
    for program in moved:
        assert program.cached[-1] > 0, f"{program.agent.program_id}: no prefix after the move"
    wait_for(
        lambda: cluster.counters(FROM_REMOTE)[survivor][FROM_REMOTE] > remote_before,
        "no prefix tokens from the remote tier on the survivor",
    )

    references = [Program(AgentProgram(f"reference-{p.seed}"), p.seed) for p in programs]
    with ThreadPoolExecutor(len(references)) as pool:
        for _ in range(len(programs[0].outputs)):
            list(pool.map(lambda p: p.turn(cluster.url), references))
    for program, reference in zip(programs, references, strict=True):
        assert program.outputs == reference.outputs, program.agent.program_id


def test_with_redis_stopped_the_replicas_keep_serving_and_nothing_hangs(cluster):
    cluster.redis_process().terminate()
    program = Program(AgentProgram("after-redis"), 999)
    recomputed_before = max(c.get(FROM_RECOMPUTE, 0.0) for c in cluster.counters(FROM_RECOMPUTE))
    started = time.monotonic()
    for _ in range(2):
        program.turn(cluster.url)  # raises on an error answer or after REQUEST_TIMEOUT_S
    assert time.monotonic() - started < REQUEST_TIMEOUT_S
    assert len(program.outputs) == 2 and program.cached[1] > 0  # the pin still serves
    wait_for(
        lambda: (
            max(c.get(FROM_RECOMPUTE, 0.0) for c in cluster.counters(FROM_RECOMPUTE))
            > recomputed_before
        ),
        "the first turn after Redis stopped was not computed",
    )


def test_sigint_stops_the_cluster_and_leaves_no_process(cluster):
    assert httpx.get(f"{cluster.url}/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    children = cluster.descendants()
    assert len(children) >= 2  # the survivor's processes and the router
    cluster.process.send_signal(signal.SIGINT)
    assert cluster.process.wait(90) == 0
    assert "continuum-tiered cluster: stopped" in "".join(cluster.lines)
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]
    assert port_is_free(int(cluster.url.rsplit(":", 1)[1]))
