"""Scheduler step time with and without ``ContinuumConnector``, side by side in one run.

The code is :mod:`continuum_tiered.lab.scheduler_overhead`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.scheduler_overhead import main

if __name__ == "__main__":
    sys.exit(main())
