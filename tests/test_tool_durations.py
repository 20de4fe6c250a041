import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from continuum_tiered.core.tool_durations import EmpiricalCDF, ToolDurationModel


def test_empirical_cdf() -> None:
    cdf = EmpiricalCDF([0.5, 1.0, 1.0, 3.0])
    assert len(cdf) == 4
    assert cdf.min() == 0.5
    assert cdf.prob_le(0.0) == 0.0
    assert cdf.prob_le(0.5) == 0.25
    assert cdf.prob_le(0.99) == 0.25
    assert cdf.prob_le(1.0) == 0.75
    assert cdf.prob_le(100.0) == 1.0
    assert cdf.candidates() == [0.0, 0.5, 1.0, 3.0]
    assert EmpiricalCDF([0.0, 0.0, 2.0]).candidates() == [0.0, 2.0]


@pytest.mark.parametrize("bad", [[], [2.0, 1.0], [-1.0, 1.0]])
def test_empirical_cdf_rejects_bad_input(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        EmpiricalCDF(bad)


@given(st.lists(st.floats(0, 100), min_size=1, max_size=50), st.floats(-1, 200))
def test_prob_le_counts_samples(samples: list[float], t: float) -> None:
    cdf = EmpiricalCDF(sorted(samples))
    assert cdf.prob_le(t) == sum(x <= t for x in samples) / len(samples)


def test_cold_start_ends_exactly_at_min_samples() -> None:
    model = ToolDurationModel(min_samples=100)
    for _ in range(99):
        model.observe("ls", 0.25)
    assert model.total_samples == 99
    assert model.distribution("ls") is None
    assert model.select(None) is None
    model.observe(None, 0.5)
    assert model.total_samples == 100
    cdf, scope = model.select("ls")
    assert scope == "global"  # ls has only 99 samples of its own
    assert len(cdf) == 100
    model.observe("ls", 0.25)
    cdf, scope = model.select("ls")
    assert scope == "tool"
    assert cdf.prob_le(0.25) == 1.0


def test_rare_tool_falls_back_to_global() -> None:
    model = ToolDurationModel(min_samples=10)
    for _ in range(10):
        model.observe("grep", 1.0)
    for _ in range(9):
        model.observe("pytest", 30.0)
    assert model.select("pytest")[1] == "global"
    assert model.distribution("pytest").prob_le(1.0) == 10 / 19
    assert model.select("unknown-tool")[1] == "global"
    assert model.select(None)[1] == "global"
    assert model.select("grep")[1] == "tool"
    assert len(model.distribution("grep")) == 10


def test_invalid_durations_are_ignored() -> None:
    model = ToolDurationModel(min_samples=1)
    for bad in (float("nan"), float("inf"), -0.1):
        model.observe("ls", bad)
    assert model.total_samples == 0
    model.observe("ls", 0.0)
    assert model.distribution("ls").samples == (0.0,)


def test_windows_keep_the_most_recent_samples() -> None:
    model = ToolDurationModel(min_samples=4, window=8)
    rng = random.Random(1)
    seen = []
    for _ in range(100):
        x = rng.choice([0.1, 0.2, 0.3, 0.5, 1.5])
        seen.append(x)
        model.observe("cat", x)
    assert model.total_samples == 100
    assert model.distribution("cat").samples == tuple(sorted(seen[-8:]))
    assert model.distribution(None).samples == tuple(sorted(seen[-8:]))


def test_untracked_tools_beyond_max_tools_feed_only_global() -> None:
    model = ToolDurationModel(min_samples=2, window=4, max_tools=2)
    for tool in ("a", "b", "c"):
        model.observe(tool, 1.0)
        model.observe(tool, 1.0)
    assert model.select("a")[1] == "tool"
    assert model.select("b")[1] == "tool"
    assert model.select("c")[1] == "global"
    assert len(model.distribution("c")) == 4


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        ToolDurationModel(min_samples=0)
    with pytest.raises(ValueError):
        ToolDurationModel(min_samples=100, window=50)
