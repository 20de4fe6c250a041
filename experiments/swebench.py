"""SWE-bench programs on live servers: vLLM, vLLM + LMCache, continuum-tiered (with tiers).

    python experiments/swebench.py [--programs 8] [--turns 8] [--jps 2] [--repeats 3]
        [--model NAME --vllm-arg='FLAGS' ...] [--out out/swebench]

Writes report.md, results.json, jct_cdf.png and avg_jct.png (see
continuum_tiered/lab/cli.py for the options).
"""

import sys

from continuum_tiered.lab.cli import experiment_main
from continuum_tiered.lab.experiment import BASELINES

if __name__ == "__main__":
    sys.exit(experiment_main("swebench", "swebench", BASELINES, "SWE-bench on live servers"))
