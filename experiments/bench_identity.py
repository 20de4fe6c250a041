"""Requests per second through the proxy holding 10,000 live conversations, against the
same proxy with conversation identity off, as a ratio measured in one run.

The code is :mod:`continuum_tiered.lab.bench_identity`; its docstring says what runs and
what it writes (docs/results/identity-bench/ by default).
"""

import sys

from continuum_tiered.lab.bench_identity import main

if __name__ == "__main__":
    sys.exit(main())
