"""Time to bring back a program's prefix from a pin, LMCache's CPU tier, its disk tier, or by
recomputing it, on vLLM's CPU build, in one run.

The code is :mod:`continuum_tiered.lab.tier_bench`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.tier_bench import main

if __name__ == "__main__":
    sys.exit(main())
