"""BFCL v4 multi-turn programs on live servers: vLLM, vLLM + LMCache, continuum-tiered
(with tiers).

    python experiments/bfcl.py [--programs 8] [--turns 8] [--jps 2] [--repeats 3]
        [--model NAME --vllm-arg='FLAGS' ...] [--out out/bfcl]

Writes report.md, results.json, jct_cdf.png and avg_jct.png (see
continuum_tiered/lab/cli.py for the options).
"""

import sys

from continuum_tiered.lab.cli import experiment_main
from continuum_tiered.lab.experiment import BASELINES

if __name__ == "__main__":
    sys.exit(experiment_main("bfcl", "bfcl", BASELINES, "BFCL v4 multi-turn on live servers"))
