"""Ablation on SWE-bench programs, each step adding one piece to the one before:

- vllm: vanilla vLLM, request FCFS, KV freed when a turn ends;
- fcfs: program-level FCFS, nothing pinned (``--policy none``);
- fcfs+ttl-2s: KV pinned 2 s during tool calls (``--policy static-ttl``);
- fcfs+cost-ttl: KV pinned for the cost model's TTL (``--policy continuum``);
- fcfs+cost-ttl+tiers: LMCache's CPU and disk tiers below the pins (``--tiers``);
- +tiered-policy: our policy (``--policy tiered``, the default): the TTL priced at the tier
  that will hold the KV, pins released under pressure by expected saving per block.

    python experiments/ablation.py [--programs 8] [--turns 8] [--jps 2] [--repeats 3]
        [--cpu-tier SIZE] [--disk-tier SIZE] [--wait-for-servers S]
        [--model NAME --vllm-arg='FLAGS' ...] [--out out/ablation]
"""

import sys

from continuum_tiered.lab.cli import experiment_main
from continuum_tiered.lab.experiment import ABLATION

if __name__ == "__main__":
    sys.exit(experiment_main("ablation", "swebench", ABLATION, "Ablation on SWE-bench"))
