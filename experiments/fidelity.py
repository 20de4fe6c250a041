"""Fidelity of the virtual-time replay against vLLM's engine alone, at three loads.

The code is :mod:`continuum_tiered.lab.fidelity`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.fidelity import main

if __name__ == "__main__":
    sys.exit(main())
