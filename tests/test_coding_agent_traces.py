"""The heavy-tailed coding-agent workloads (claude-code, codex): their stated distributions,
their reproducibility, and their wiring into named traces and ``trace stats``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from statistics import median

import pytest

from continuum_tiered.cli import main
from continuum_tiered.traces.arrivals import NAMES, SWEBENCH_FULL, load_named_trace
from continuum_tiered.traces.build import BuildOptions, data_path
from continuum_tiered.traces.coding_agents import (
    CODING_AGENTS,
    HUMAN_MAX_S,
    HUMAN_MIN_S,
    MAX_PAUSE_S,
    SWEBENCH_LONG_SHARE,
    TAIL_MAX_S,
    TAIL_MIN_S,
    TAIL_TIME_SHARE_MIN,
    HeavyTailedToolTimes,
    body_mu_for,
    is_long_tool,
    load_coding_agent,
    swebench_tail_p,
)
from continuum_tiered.traces.swebench import EMBEDDED_PROGRAMS, load_swebench

DRAWS = 200_000
EMBEDDED = data_path(EMBEDDED_PROGRAMS)
needs_full = pytest.mark.skipif(not SWEBENCH_FULL.is_file(), reason="no ../shared traces")


def tool_mix(path: object = EMBEDDED) -> list[str]:
    """The tools of every call that pauses (the last call of a program never does)."""
    programs = load_swebench(path, limit=None)  # type: ignore[arg-type]
    return [t.tool for p in programs for t in p.turns[:-1] if t.tool is not None]


def tool_times(times: HeavyTailedToolTimes, tools: Sequence[str]) -> list[float]:
    rng = random.Random(7)
    return [times.tool_time(rng.choice(tools), rng) for _ in range(DRAWS)]


def tail_time_share(draws: Sequence[float]) -> float:
    return sum(x for x in draws if TAIL_MIN_S <= x <= TAIL_MAX_S) / sum(draws)


@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_mixture_median_tail_share_and_bound(agent: str) -> None:
    times = CODING_AGENTS[agent]
    draws = tool_times(times, tool_mix())
    assert median(draws) == pytest.approx(times.median_s, rel=0.03)
    assert tail_time_share(draws) >= TAIL_TIME_SHARE_MIN
    assert min(draws) > 0 and max(draws) <= TAIL_MAX_S
    # Both components occur: sub-second calls are most, the tail is rare but present.
    assert 0.02 < sum(x >= TAIL_MIN_S for x in draws) / DRAWS < 0.15


def test_cited_medians() -> None:
    """The DESIGN.md §8 figures: 125 ms (Claude Code), 626 ms (Codex)."""
    assert CODING_AGENTS["claude-code"].median_s == 0.125
    assert CODING_AGENTS["codex"].median_s == 0.626


@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_body_constants_are_solved(agent: str) -> None:
    times = CODING_AGENTS[agent]
    solved = body_mu_for(times.median_s, times.body_sigma, swebench_tail_p(times))
    assert times.body_mu == pytest.approx(solved, abs=1e-4)


@needs_full
@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_calibrated_on_the_full_tool_mix(agent: str) -> None:
    tools = tool_mix(SWEBENCH_FULL)
    assert sum(map(is_long_tool, tools)) / len(tools) == pytest.approx(
        SWEBENCH_LONG_SHARE, abs=5e-4
    )
    times = CODING_AGENTS[agent]
    draws = tool_times(times, tools)
    assert median(draws) == pytest.approx(times.median_s, rel=0.03)
    assert tail_time_share(draws) >= TAIL_TIME_SHARE_MIN


def test_tail_is_tool_aware() -> None:
    times = CODING_AGENTS["claude-code"]
    rng = random.Random(3)
    long_share = {
        tool: sum(times.tool_time(tool, rng) >= TAIL_MIN_S for _ in range(20_000)) / 20_000
        for tool in ("pytest", "python3", "reproduce.sh", "cat", "grep", "other")
    }
    for tool in ("pytest", "python3", "reproduce.sh"):
        assert long_share[tool] == pytest.approx(times.tail_p_long, abs=0.015)
    for tool in ("cat", "grep", "other"):
        assert long_share[tool] == pytest.approx(times.tail_p_short, abs=0.005)


@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_human_waits_at_the_stated_rate(agent: str) -> None:
    times = CODING_AGENTS[agent]
    rng = random.Random(5)
    waits = [times.human_wait("grep", rng) for _ in range(DRAWS)]
    occurred = [w for w in waits if w > 0]
    assert len(occurred) / DRAWS == pytest.approx(times.human_wait_p, abs=0.003)
    assert min(occurred) >= HUMAN_MIN_S and max(occurred) <= HUMAN_MAX_S
    # Log-uniform on [5 s, 600 s]: median sqrt(5 * 600) = 54.8 s.
    assert median(occurred) == pytest.approx((HUMAN_MIN_S * HUMAN_MAX_S) ** 0.5, rel=0.05)
    # A reply without a tool hands control to the user: no tool time, always a human wait.
    assert times.tool_time(None, rng) == 0.0
    assert all(HUMAN_MIN_S <= times.sample(None, rng) <= HUMAN_MAX_S for _ in range(1000))


@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_pauses_are_bounded(agent: str) -> None:
    programs = load_coding_agent(agent, BuildOptions(seed=1), path=EMBEDDED)
    pauses = [t.tool_duration_s for p in programs for t in p.turns]
    assert max(pauses) <= MAX_PAUSE_S
    assert all(p.turns[-1].tool_duration_s == 0.0 for p in programs)
    tool_less = [t.tool_duration_s for p in programs for t in p.turns[:-1] if t.tool is None]
    assert tool_less and min(tool_less) >= HUMAN_MIN_S


def test_deterministic_per_seed_and_program() -> None:
    options = BuildOptions(seed=4)
    first = load_coding_agent("codex", options, limit=10, path=EMBEDDED)
    assert first == load_coding_agent("codex", options, limit=10, path=EMBEDDED)
    # A program's pauses do not depend on what else is loaded with it.
    assert first[:3] == load_coding_agent("codex", options, limit=3, path=EMBEDDED)
    other = load_coding_agent("codex", BuildOptions(seed=5), limit=10, path=EMBEDDED)
    assert [p.turns for p in first] != [p.turns for p in other]
    claude = load_coding_agent("claude-code", options, limit=10, path=EMBEDDED)
    assert [p.turns for p in first] != [p.turns for p in claude]


@pytest.mark.parametrize("agent", list(CODING_AGENTS))
def test_token_structure_is_swebench(agent: str) -> None:
    options = BuildOptions(seed=2, token_scale=0.5)
    ours = load_coding_agent(agent, options, limit=20, path=EMBEDDED)
    swe = load_swebench(EMBEDDED, options=options, limit=20)
    assert [p.program_id for p in ours] == [p.program_id for p in swe]

    def shape(programs: Sequence) -> list:
        return [[(t.prompt_tokens, t.output_tokens, t.tool) for t in p.turns] for p in programs]

    assert shape(ours) == shape(swe)
    pauses = [[t.tool_duration_s for t in p.turns] for p in ours]
    assert pauses != [[t.tool_duration_s for t in p.turns] for p in swe]


def test_unknown_agent_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown coding agent 'aider'; known: claude-code, codex"):
        load_coding_agent("aider", BuildOptions())


def test_named_trace() -> None:
    assert {"claude-code", "codex"} <= set(NAMES)
    programs = load_named_trace("codex", programs=5, seed=3)
    assert len(programs) == 5
    swe = load_named_trace("swebench", programs=5, seed=3)
    assert [p.program_id for p in programs] == [p.program_id for p in swe]
    tool_calls = [t for p in programs for t in p.turns[:-1] if t.tool is not None]
    assert any(t.tool_duration_s < TAIL_MIN_S for t in tool_calls)


def stats_rows(printed: str) -> dict[str, list[float]]:
    """``trace stats`` rows by label: n, mean, std, min, median, p90, max."""
    rows = {}
    for line in printed.splitlines()[2:]:
        rows[line[:28].strip()] = [float(x.replace(",", "")) for x in line[28:].split()]
    return rows


def test_cli_stats_shows_the_tail(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "stats", "claude-code", "--programs", "20"]) == 0
    printed = capsys.readouterr().out
    assert "trace claude-code" in printed
    rows = stats_rows(printed)
    assert {"tool duration (s)", "pause (s)", "% pause time in 1 s-10 min"} <= set(rows)
    n, mean, _std, low, med, _p90, high = rows["pause (s)"]
    assert n > 20 and low >= 0 and high <= MAX_PAUSE_S and mean > 10 * med
    # In a typical program nearly all pause time is in the long pauses (one is enough).
    share = rows["% pause time in 1 s-10 min"]
    assert share[0] == 20 and share[4] >= 100 * TAIL_TIME_SHARE_MIN
    # The recorded SWE-bench durations have no such tail: the row tells them apart.
    assert main(["trace", "stats", "swebench", "--programs", "20"]) == 0
    swebench = stats_rows(capsys.readouterr().out)
    assert swebench["% pause time in 1 s-10 min"][4] < share[4] - 20
