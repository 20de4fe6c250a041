"""Routing a cluster of agent-serving replicas, in virtual time (issue 16).

The code is :mod:`continuum_tiered.lab.cluster_grid`; its docstring says what runs and what
it writes.
"""

import sys

from continuum_tiered.lab.cluster_grid import main

if __name__ == "__main__":
    sys.exit(main())
