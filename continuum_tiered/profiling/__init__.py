"""Offline profiling: tier bandwidths, prefill and decode step time, as a tier profile.

``continuum-tiered profile`` (``cli.py``) drives memory copies (``transfers.py``), disk
I/O (``disk.py``) and model runs (``compute.py``); ``measure.py`` holds what they share
and ``report.py`` the summary table and the plot.
"""
