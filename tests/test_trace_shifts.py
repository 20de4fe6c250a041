import pytest

from continuum_tiered.traces.model import TraceProgram, Turn
from continuum_tiered.traces.shifts import bimodal_tools, slow_tools_after


def _programs(n: int) -> list[TraceProgram]:
    turn = Turn(prompt_tokens=100, output_tokens=10, tool="ls", tool_duration_s=0.5)
    return [TraceProgram(f"p{i}", (turn, turn), arrival_s=float(n - i)) for i in range(n)]


def test_slow_tools_after_half_by_arrival() -> None:
    shifted = slow_tools_after(_programs(4), factor=10.0, fraction=0.5)
    assert [p.arrival_s for p in shifted] == [1.0, 2.0, 3.0, 4.0]
    assert [p.turns[0].tool_duration_s for p in shifted] == [0.5, 0.5, 5.0, 5.0]
    assert shifted[3].turns[1].prompt_tokens == 100  # only durations change
    with pytest.raises(ValueError, match="factor"):
        slow_tools_after(_programs(2), factor=0.0)


def test_bimodal_tools_mix_and_seed() -> None:
    programs = bimodal_tools(_programs(200), seed=3)
    durations = [t.tool_duration_s for p in programs for t in p.turns]
    long = [d for d in durations if d > 1.0]
    assert all(54.0 <= d <= 66.0 for d in long)
    assert 0.05 < len(long) / len(durations) < 0.15
    assert all(0.05 <= d < 1.0 for d in durations if d <= 1.0)
    assert bimodal_tools(_programs(200), seed=3) == programs
    with pytest.raises(ValueError, match="long_share"):
        bimodal_tools(_programs(1), seed=0, long_share=2.0)
