import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from continuum_tiered.core.tool_durations import EmpiricalCDF
from continuum_tiered.core.ttl import (
    EtaEstimator,
    SlidingMean,
    best_ttl,
    cold_start_ttl,
    fast_best_ttl,
)

durations = st.lists(
    st.floats(0.0, 100.0) | st.sampled_from([0.2, 0.25, 0.5, 1.0, 2.0]), min_size=1, max_size=60
)
benefits = st.floats(-10.0, 1000.0)


def brute_force_ttl(cdf: EmpiricalCDF, benefit: float) -> float:
    scores = [(cdf.prob_le(tau) * benefit - tau, -tau) for tau in cdf.candidates()]
    return -max(scores)[1]


@given(durations, benefits)
def test_best_ttl_is_the_smallest_argmax(samples: list[float], benefit: float) -> None:
    cdf = EmpiricalCDF(sorted(samples))
    assert best_ttl(cdf, benefit) == brute_force_ttl(cdf, benefit)


@given(durations, benefits)
def test_fast_best_ttl_reaches_the_brute_force_optimum(samples: list[float], benefit: float):
    cdf = EmpiricalCDF(sorted(samples))
    fast = fast_best_ttl(cdf, benefit)
    exact = brute_force_ttl(cdf, benefit)
    assert fast in cdf.candidates()

    def objective(tau: float) -> float:
        return cdf.prob_le(tau) * benefit - tau

    assert objective(fast) == pytest.approx(objective(exact), rel=1e-12, abs=1e-12)
    if not math.isclose(objective(fast), objective(exact), rel_tol=0, abs_tol=0):
        return  # a float tie the two computations break differently
    assert fast == exact


@given(durations, st.floats(0.0, 1.0))
def test_best_ttl_is_zero_when_benefit_is_below_every_sample(
    samples: list[float], fraction: float
) -> None:
    cdf = EmpiricalCDF(sorted(samples))
    if cdf.min() > 0:
        assert best_ttl(cdf, fraction * cdf.min() * 0.999) == 0.0


@given(durations, benefits, benefits)
def test_best_ttl_is_monotone_in_benefit(samples: list[float], b1: float, b2: float) -> None:
    cdf = EmpiricalCDF(sorted(samples))
    low, high = sorted((b1, b2))
    assert best_ttl(cdf, low) <= best_ttl(cdf, high)


def test_best_ttl_hand_cases() -> None:
    cdf = EmpiricalCDF([0.2] * 9 + [30.0])
    # 0.2 s covers 90%: 0.9 * 1.0 - 0.2 = 0.7 > 0; waiting 30 s for the rest never pays here.
    assert best_ttl(cdf, 1.0) == 0.2
    assert best_ttl(cdf, 0.2) == 0.0
    # Covering the tail pays once 0.1 * B > 29.8.
    assert best_ttl(cdf, 297.0) == 0.2
    assert best_ttl(cdf, 299.0) == 30.0
    # Tie: 0.5 * 2 - 0.5 = 0.5 at tau = 0.5 and 1.0 * 2 - 1.5 = 0.5 at tau = 1.5.
    assert best_ttl(EmpiricalCDF([0.5, 1.5]), 2.0) == 0.5
    # Samples at zero count at tau = 0.
    assert best_ttl(EmpiricalCDF([0.0, 0.0, 5.0]), 1.0) == 0.0


def test_cold_start_ttl() -> None:
    assert cold_start_ttl(0.0) == 0.0
    assert cold_start_ttl(0.5) == 0.0
    assert cold_start_ttl(1.0) == 0.0
    assert cold_start_ttl(math.e) == pytest.approx(1.0)
    assert cold_start_ttl(20.0) == pytest.approx(math.log(20.0))


def test_cold_start_ttl_is_the_exponential_optimum() -> None:
    benefit = 7.0
    tau = cold_start_ttl(benefit)

    def gain(t: float) -> float:
        return (1 - math.exp(-t)) * benefit - t

    assert all(gain(tau) >= gain(tau + d) for d in (-0.5, -0.01, 0.01, 0.5))


def test_sliding_mean() -> None:
    mean = SlidingMean(window=3)
    assert (mean.value, mean.count) == (0.0, 0)
    for x in (1.0, 2.0, 3.0):
        mean.add(x)
    assert mean.value == 2.0
    mean.add(10.0)
    assert (mean.value, mean.count) == (5.0, 3)
    mean.add(float("nan"))
    assert mean.count == 3
    with pytest.raises(ValueError):
        SlidingMean(window=0)


def test_eta_is_one_until_enough_programs() -> None:
    eta = EtaEstimator(min_programs=3)
    eta.program_finished(5)
    eta.program_finished(50)
    assert eta.value == 1.0
    eta.program_finished(1)
    assert eta.value < 1.0


def test_eta_fixed_length_programs() -> None:
    eta = EtaEstimator(min_programs=10)
    for _ in range(20):
        eta.program_finished(11)
    assert eta.value == pytest.approx(1.0)


def test_eta_single_turn_programs_leave_corr_undefined() -> None:
    eta = EtaEstimator(min_programs=2)
    for _ in range(5):
        eta.program_finished(1)
    assert eta.value == 1.0


def test_eta_ignores_empty_programs() -> None:
    eta = EtaEstimator(min_programs=1)
    eta.program_finished(0)
    assert eta.count == 0


def test_eta_geometric_turn_counts_are_memoryless() -> None:
    rng = random.Random(2511)
    eta = EtaEstimator(min_programs=10, window=5000)
    for _ in range(5000):
        turns = 1
        while rng.random() < 0.85:
            turns += 1
        eta.program_finished(turns)
    assert abs(eta.value) < 0.1


def _brute_corr(turns: list[int]) -> float:
    pairs = [(k, n - k) for n in turns for k in range(1, n + 1)]
    m = len(pairs)
    mx = sum(k for k, _ in pairs) / m
    my = sum(r for _, r in pairs) / m
    cov = sum((k - mx) * (r - my) for k, r in pairs)
    vx = sum((k - mx) ** 2 for k, _ in pairs)
    vy = sum((r - my) ** 2 for _, r in pairs)
    return cov / math.sqrt(vx * vy)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 10))
def test_eta_matches_pairwise_correlation_over_the_window(turns: list[int], window: int) -> None:
    eta = EtaEstimator(min_programs=1, window=window)
    for n in turns:
        eta.program_finished(n)
    recent = turns[-window:]
    if all(n == 1 for n in recent):
        assert eta.value == 1.0
    else:
        expected = min(1.0, max(0.0, -_brute_corr(recent)))
        assert eta.value == pytest.approx(expected, abs=1e-9)


def test_eta_clamps_positive_correlation_to_zero() -> None:
    # Many one-turn programs and a few long ones: across programs, k and N - k grow
    # together, which outweighs their negative correlation within a program.
    turns = [1] * 1000 + [100] * 5
    assert _brute_corr(turns) > 0.1
    eta = EtaEstimator(min_programs=1, window=len(turns))
    for n in turns:
        eta.program_finished(n)
    assert eta.value == 0.0
