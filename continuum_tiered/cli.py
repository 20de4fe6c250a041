"""The ``continuum-tiered`` command."""

from __future__ import annotations

import argparse
import sys

from continuum_tiered.client.proxy.cli import add_proxy_parser
from continuum_tiered.cluster.cli import add_cluster_parser
from continuum_tiered.lab import demo
from continuum_tiered.profiling import cli as profiling_cli
from continuum_tiered.replay.cli import add_replay_parser
from continuum_tiered.sim.cli import add_simulate_parser
from continuum_tiered.traces.cli import add_trace_parser
from continuum_tiered.vllm import serve

# Commands that hand the arguments they do not know to vLLM (cluster: to every replica).
PASSTHROUGH_COMMANDS = ("serve", "cluster")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="continuum-tiered",
        description="Tool-call-aware KV retention and program-level scheduling for vLLM.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    serve.add_serve_parser(subparsers)
    demo.add_demo_parser(subparsers)
    profiling_cli.add_profile_parser(subparsers)
    add_trace_parser(subparsers)
    add_simulate_parser(subparsers)
    add_replay_parser(subparsers)
    add_proxy_parser(subparsers)
    add_cluster_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command not in PASSTHROUGH_COMMANDS:
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    try:
        return args.run(args, passthrough)
    except ValueError as err:  # every user-facing error type derives from ValueError
        print(f"continuum-tiered {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
