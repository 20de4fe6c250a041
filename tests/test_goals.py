from continuum_tiered.core.metrics import RunSummary
from continuum_tiered.lab.goals import robustness_check, setting_checks


def _run(policy: str, jps: float, avg: float, p95: float | None = None, tput: float = 100.0):
    p95 = avg * 2 if p95 is None else p95
    return RunSummary(policy, jps, 10, avg, avg, p95, p95, tput, 0.0, 0.5)


def test_setting_checks_compare_at_every_load_and_continuum_at_the_heavier_two() -> None:
    runs = []
    for jps, oracle, ours, continuum in ((1, 10, 10.5, 10.5), (2, 10, 12, 20), (4, 10, 10.9, 11)):
        runs += [
            _run("oracle", jps, oracle),
            _run("tiered", jps, ours),
            _run("continuum", jps, continuum),
            _run("vllm", jps, 30, tput=90.0),
        ]
    checks = setting_checks(runs)
    by = {(c.name, c.jps): c for c in checks}
    assert ("avg JCT / continuum", 1) not in by  # light load: no Continuum target
    assert by[("avg JCT / oracle", 1)].passed
    assert not by[("avg JCT / oracle", 2)].passed  # 1.2x
    assert by[("avg JCT / continuum", 2)].passed  # 0.6x
    assert not by[("avg JCT / continuum", 4)].passed  # 0.99x: not 10% better
    assert by[("p95 JCT / continuum", 4)].passed
    assert all(c.passed for c in checks if c.name.startswith(("avg JCT / vllm", "vllm thr")))
    assert by[("avg JCT / oracle", 2)].line().startswith("MISS: avg JCT / oracle at 2 jps: 1.200")


def test_robustness_against_the_better_baseline() -> None:
    runs = [_run("vllm+lmcache", 2, 20), _run("continuum", 2, 10), _run("tiered", 2, 10.1)]
    check = robustness_check("bimodal", runs)
    assert check.passed and check.ratio == 1.01
    runs[-1] = _run("tiered", 2, 10.5)
    assert not robustness_check("bimodal", runs).passed


def test_an_oracle_check_names_the_retention_bound_where_it_ran() -> None:
    """The bound (every KV kept at no cost, in the real GPU pool) tells a gap no retention
    policy can close from one it can; a miss stays a miss either way."""
    runs = [
        _run("oracle", 4, 10),
        _run("retention-bound", 4, 11.5),
        _run("tiered", 4, 11.8),
        _run("continuum", 4, 20),
        _run("vllm", 4, 30),
    ]
    by = {(c.name, c.jps): c for c in setting_checks(runs)}
    check = by[("avg JCT / oracle", 4)]
    assert not check.passed and check.bound == 1.15
    assert check.line() == (
        "MISS: avg JCT / oracle at 4 jps: 1.180 (limit 1.1); the retention bound: 1.150"
    )
    assert by[("avg JCT / continuum", 4)].bound is None
