"""Speed of the virtual-time replay: the full SWE-bench trace, one policy, one load.

Prints programs simulated per wall-clock second (target: 500 programs in under 5 minutes
on a 2-core machine) next to what the run produced, so a regression in either shows.

    python experiments/bench_simulate.py [--policy continuum] [--jps 0.1] [--programs 500]
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from continuum_tiered.core.deployment import Deployment
from continuum_tiered.sim.peers import get_peer
from continuum_tiered.sim.simulate import ReplaySetup, replay
from continuum_tiered.traces.arrivals import load_named_trace, with_poisson_arrivals

TARGET_S = 300.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="continuum")
    p.add_argument("--jps", type=float, default=0.1)
    p.add_argument("--programs", type=int, default=500)
    p.add_argument("--profile", default="h100-llama-3.1-8b")
    args = p.parse_args()
    programs = with_poisson_arrivals(
        load_named_trace("swebench", programs=args.programs), args.jps, seed=0
    )
    turns = sum(len(prog.turns) for prog in programs)
    setup = ReplaySetup(Deployment(), args.profile)
    start = time.perf_counter()
    with tqdm(total=len(programs), unit="program") as bar:
        summary, _ = replay(get_peer(args.policy), programs, setup, args.jps, bar.update)
    wall = time.perf_counter() - start
    print(f"{len(programs)} programs ({turns} turns), policy {args.policy} at {args.jps} jps")
    print(f"wall {wall:.1f} s: {len(programs) / wall:.2f} programs/s, {turns / wall:.0f} turns/s")
    print(f"virtual: avg JCT {summary.avg_jct_s:.1f} s, p95 {summary.p95_jct_s:.1f} s")
    verdict = "PASS" if wall <= TARGET_S * len(programs) / 500 else "FAIL"
    print(f"{verdict}: target 500 programs in {TARGET_S:.0f} s")


if __name__ == "__main__":
    main()
