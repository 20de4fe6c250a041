"""Chaos: no wrong output and nothing hangs when the tiers, the server or the proxy's upstream fail
under running agent programs.

The code is :mod:`continuum_tiered.lab.chaos`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.chaos import main

if __name__ == "__main__":
    sys.exit(main())
