"""Hostile and malformed request bodies against a live ``continuum-tiered serve``: every one
answered 400 naming the problem, or served; never a 5xx; no KV block left behind.

The code is :mod:`continuum_tiered.lab.hint_fuzz`; its docstring says what runs and what it
writes.
"""

import sys

from continuum_tiered.lab.hint_fuzz import main

if __name__ == "__main__":
    sys.exit(main())
