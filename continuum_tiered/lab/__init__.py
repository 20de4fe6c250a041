"""The experiment harness: everything that produces a figure in ``docs/results/``.

Live servers: ``experiment`` (systems served one after another), ``report``, ``cli``,
``demo``, ``in_process_replay``, ``fidelity``, ``tier_bench``, ``bench_cluster``. Virtual
time: ``components``, ``beyond_continuum``, ``goals``, ``scheduler_overhead``,
``scheduler_fuzz``. Reliability: ``reliability``, ``soak``, ``chaos``, ``hint_fuzz``. The
scripts in ``experiments/`` are their entry points.
"""
