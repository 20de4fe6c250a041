"""Where `tiered`'s gain comes from, against the strongest peers, and how it moves with hardware.

The code is :mod:`continuum_tiered.lab.components`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.components import main

if __name__ == "__main__":
    sys.exit(main())
