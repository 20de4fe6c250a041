"""``continuum-tiered cluster``: N replicas, Redis and vLLM's router on this machine."""

from __future__ import annotations

import argparse
import signal
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

from continuum_tiered.cluster.launch import Cluster, ClusterConfig
from continuum_tiered.cluster.replicas import ReplicaConfig
from continuum_tiered.cluster.router import ROUTER_POLICIES
from continuum_tiered.core.server_process import tiny_engine_flags
from continuum_tiered.core.tiny_model import write_tiny_llama

DEFAULT_TIERS = "cpu=256MiB"
TINY_KV_BLOCKS = 256


def add_cluster_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "cluster",
        help="N continuum-tiered replicas behind vLLM's router, with a shared Redis KV tier",
        description=(
            "Starts Redis (the shared KV tier), N `continuum-tiered serve` replicas and "
            "vllm-router in front of them, prints the endpoint, and stops everything on "
            "Ctrl-C or SIGTERM. With --router-policy consistent_hash (the default) every "
            "request carrying the same X-Session-ID header (AgentProgram and the proxy send "
            "the program id there) reaches the same replica. Arguments after the options go "
            "to every replica's serve (retention options, vLLM flags)."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        help="model for every replica (default: a tiny random Llama, for the CPU build)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument(
        "--tiers",
        default=DEFAULT_TIERS,
        help="each replica's local LMCache tiers, cpu=SIZE[,disk=PATH:SIZE[:cleanup]] (a disk "
        f"tier gets a folder per replica under PATH; default: {DEFAULT_TIERS})",
    )
    p.add_argument("--policy", help="retention policy of every replica (default: serve's)")
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a retention policy option of every replica, as for serve (repeatable)",
    )
    p.add_argument("--router-policy", choices=ROUTER_POLICIES, default="consistent_hash")
    p.add_argument(
        "--shared-tier",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a Redis server as the remote tier behind every replica's local tiers, so a "
        "program that moves finds its prefix there (default: on)",
    )
    p.add_argument("--port", type=int, default=8000, help="the router's port (default: 8000)")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=TINY_KV_BLOCKS,
        help=f"the tiny model's KV pool per replica, in 32-token blocks (default: "
        f"{TINY_KV_BLOCKS})",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=int,
        default=0,
        metavar="K",
        help="give replica i GPUs i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES; default 0: every "
        "replica sees the devices this command sees)",
    )
    p.add_argument("--redis-maxmemory", default="1gb", help="the shared tier's size")
    p.add_argument(
        "--workdir", type=Path, help="logs and the tiny model (default: a temporary folder)"
    )
    p.set_defaults(run=run_cluster)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_cluster(args: argparse.Namespace, passthrough: list[str]) -> int:
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return _run(args, passthrough)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, passthrough: list[str]) -> int:
    with ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="continuum-cluster-"))
        )
        if args.model is None:
            model = str(write_tiny_llama(workdir / "model"))
            engine_flags = tiny_engine_flags(Path(model), args.kv_blocks)
        else:
            model, engine_flags = args.model, []
        policy = ["--policy", args.policy] if args.policy else []
        policy += [arg for item in args.policy_option for arg in ("--policy-option", item)]
        config = ClusterConfig(
            replicas=args.replicas,
            replica=ReplicaConfig(
                model,
                (*policy, *engine_flags, *passthrough),
                local_tiers=args.tiers,
                gpus_per_replica=args.gpus_per_replica,
            ),
            shared_tier=args.shared_tier,
            router_policy=args.router_policy,
            port=args.port,
            redis_maxmemory=args.redis_maxmemory,
        )
        cluster = Cluster(config, workdir, progress=lambda line: print(line, flush=True))
        try:
            with cluster:
                print(
                    f"continuum-tiered cluster: {cluster.url} ({args.replicas} replicas, "
                    f"router {args.router_policy}"
                    + (f", shared tier {cluster.redis.url}" if cluster.redis else "")
                    + "); Ctrl-C stops it",
                    flush=True,
                )
                cluster.wait()
        except KeyboardInterrupt:
            print("continuum-tiered cluster: stopped", flush=True)
    return 0
