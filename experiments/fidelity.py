"""Fidelity of the virtual-time replay: predicted vs measured average JCT on this machine.

1. Profile the demo model on this CPU (``continuum-tiered profile --device cpu --engine``):
   the replay steps as long as the vLLM engine does, not as a bare forward pass.
2. Replay a small SWE-bench slice in real time against ``continuum-tiered serve`` on the
   CPU build of vLLM (real HTTP, real engine, real tool pauses).
3. Replay the same programs, arrivals and KV pool in virtual time with that profile.
4. Print both average JCTs and the relative error (target: within 15%).

    python experiments/fidelity.py [--programs 6] [--turns 6] [--jps 0.5] [--out out/fidelity]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from pathlib import Path

from continuum_tiered.agent_runner import RunnerOptions, run_programs, summarize_records
from continuum_tiered.cli import main as cli
from continuum_tiered.demo import DEMO_SHAPE
from continuum_tiered.experiment import CPU_ENGINE_ENV
from continuum_tiered.server import ServerProcess, plugin_server_command
from continuum_tiered.sim.deployment import Deployment
from continuum_tiered.sim.peers import get_peer
from continuum_tiered.sim.replay import ReplaySetup, replay
from continuum_tiered.tiny_model import write_tiny_llama
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals

MAX_BATCHED_TOKENS = 2048
MAX_SEQS = 64
TARGET = 0.15
PEER = "continuum"  # the retention policy on both sides


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, default=6)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--token-scale", type=float, default=0.25)
    p.add_argument("--kv-blocks", type=int, default=256)
    p.add_argument("--jps", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/fidelity"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = write_tiny_llama(args.out / "model", DEMO_SHAPE)
    profile = args.out / "cpu-profile.json"
    measure = ["--device", "cpu", "--quick", "--engine", "--max-tokens", "4096"]
    if cli(["profile", "--model", str(model), *measure, "--out", str(profile)]) != 0:
        return 1
    programs = [
        dataclasses.replace(program, turns=program.turns[: args.turns])
        for program in load_named_trace(
            "swebench", programs=args.programs, seed=args.seed, token_scale=args.token_scale
        )
    ]
    programs = with_poisson_arrivals(programs, args.jps, args.seed)

    engine = ["--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--max-num-seqs", str(MAX_SEQS)]
    # The policy the virtual replay runs: the server's default may be another one.
    serve = ["--policy", PEER, "--profile", str(profile)]
    command = plugin_server_command(model, args.kv_blocks, *serve, *engine)
    print("real time: starting continuum-tiered serve ...", flush=True)
    # The core layout of vLLM's CPU worker without a connector, as the engine profile ran.
    with ServerProcess(command, args.out / "server.log", env=CPU_ENGINE_ENV) as server:
        options = RunnerOptions(model="tiny", send_hints=True, seed=args.seed)
        load_before = os.getloadavg()[0]
        records = asyncio.run(run_programs(server.url, programs, options))
        load_after = os.getloadavg()[0]
    real = summarize_records("continuum", args.jps, records)

    deployment = Deployment(
        model=str(model),
        device="cpu",
        num_blocks=args.kv_blocks,
        block_size=32,
        max_num_batched_tokens=MAX_BATCHED_TOKENS,
        max_num_seqs=MAX_SEQS,
    )
    print("virtual time: replaying the same programs ...", flush=True)
    virtual, _ = replay(
        get_peer(PEER), programs, ReplaySetup(deployment, str(profile), args.seed), args.jps
    )
    error = virtual.avg_jct_s / real.avg_jct_s - 1
    print(f"\n{len(programs)} programs x {args.turns} turns, {args.jps} programs/s, CPU build")
    print(
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after the real run "
        f"on {os.cpu_count()} CPUs (other work on these cores inflates real times)"
    )
    print(f"{'':<18}{'real':>10}{'virtual':>10}")
    for key in ("avg_jct_s", "p95_jct_s", "prefix_hit_ratio"):
        print(f"{key:<18}{getattr(real, key):>10.2f}{getattr(virtual, key):>10.2f}")
    verdict = "PASS" if abs(error) <= TARGET else "FAIL"
    print(f"{verdict}: predicted average JCT off by {error:+.1%} (target within {TARGET:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
