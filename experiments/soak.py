"""Soak: 1,000 agent programs through ``continuum-tiered replay`` against one ``continuum-tiered
serve --tiers`` on vLLM's CPU build, and whether the server comes back to where it started.

The code is :mod:`continuum_tiered.lab.soak`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.soak import main

if __name__ == "__main__":
    sys.exit(main())
