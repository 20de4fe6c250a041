"""Beyond Continuum: our default with tiers, ``tiered``, against ``oracle`` and ``vllm``.

The code is :mod:`continuum_tiered.lab.beyond_continuum`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.beyond_continuum import main

if __name__ == "__main__":
    sys.exit(main())
