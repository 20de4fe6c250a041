"""Two continuum-tiered replicas behind vLLM's router on the CPU build: round_robin against
consistent_hash against consistent_hash with the shared Redis tier, as ratios in one run.

The code is :mod:`continuum_tiered.lab.bench_cluster`; its docstring says what runs and
what it writes (docs/results/cluster-bench/ by default).
"""

import sys

from continuum_tiered.lab.bench_cluster import main

if __name__ == "__main__":
    sys.exit(main())
