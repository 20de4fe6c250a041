import pytest

from continuum_tiered.core.programs import ProgramState, ProgramTable


def test_seq_follows_first_arrival_order() -> None:
    table = ProgramTable()
    for i, pid in enumerate(["c", "a", "b"]):
        assert table.arrive(pid, now_s=float(i)).seq == i
    again = table.arrive("c", now_s=10.0)
    assert again.seq == 0
    assert again.first_arrival_s == 0.0
    assert [p.program_id for p in sorted(table, key=lambda p: p.seq)] == ["c", "a", "b"]
    assert len(table) == 3


def test_turn_lifecycle() -> None:
    table = ProgramTable()
    program = table.arrive("p", 1.0)
    assert program.state is ProgramState.RUNNING
    table.record_prompt("p", prompt_tokens=100, prefix_hit_tokens=0)

    table.turn_finished("p", 2.0, tool="grep", context_tokens=120, pinned=True)
    assert program.state is ProgramState.PINNED
    assert (program.turns_served, program.last_finish_s) == (1, 2.0)
    assert (program.last_tool, program.last_context_tokens) == ("grep", 120)

    table.mark_evicted("p")
    assert program.state is ProgramState.EVICTED

    assert table.arrive("p", 3.0) is program
    assert program.state is ProgramState.RUNNING
    table.record_prompt("p", prompt_tokens=150, prefix_hit_tokens=96)
    assert (program.prompt_tokens, program.prefix_hit_tokens) == (250, 96)

    table.turn_finished("p", 4.0, tool=None, context_tokens=170, pinned=False)
    assert program.state is ProgramState.IN_TOOL_CALL
    assert program.turns_served == 2

    ended = table.end("p")
    assert ended is program
    assert ended.state is ProgramState.FINISHED
    assert table.get("p") is None
    assert len(table) == 0
    assert table.end("p") is None


def test_mark_evicted_leaves_running_and_unknown_programs_alone() -> None:
    table = ProgramTable()
    table.arrive("p", 0.0)
    table.mark_evicted("p")
    table.mark_evicted("nobody")
    assert table.get("p").state is ProgramState.RUNNING
    assert len(table) == 1


def test_turn_finished_recreates_a_dropped_program() -> None:
    table = ProgramTable()
    table.arrive("a", 0.0)
    program = table.turn_finished("ghost", 1.0, "ls", 10, pinned=False)
    assert (program.seq, program.turns_served) == (1, 1)


def test_bound_drops_least_recently_active_non_running_program() -> None:
    table = ProgramTable(max_programs=3)
    table.arrive("a", 0.0)  # stays running
    table.arrive("b", 1.0)
    table.turn_finished("b", 2.0, "ls", 10, pinned=False)
    table.arrive("c", 3.0)
    table.turn_finished("c", 4.0, "ls", 10, pinned=True)
    table.arrive("b", 5.0)
    table.turn_finished("b", 6.0, "ls", 10, pinned=False)  # b more recent than c now

    table.arrive("d", 7.0)
    assert {p.program_id for p in table} == {"a", "b", "d"}
    table.arrive("e", 8.0)  # a, d run: b is the only candidate
    assert {p.program_id for p in table} == {"a", "d", "e"}
    assert table.get("e").seq == 4

    table.arrive("f", 9.0)  # everyone runs: nothing can be dropped
    assert len(table) == 4


def test_bound_holds_under_many_abandoned_programs() -> None:
    table = ProgramTable(max_programs=50)
    for i in range(1000):
        table.arrive(str(i), float(i))
        table.turn_finished(str(i), i + 0.5, "ls", 10, pinned=False)
    assert len(table) == 50
    assert {p.program_id for p in table} == {str(i) for i in range(950, 1000)}


def test_iteration_tolerates_ending_programs() -> None:
    table = ProgramTable()
    for pid in "abc":
        table.arrive(pid, 0.0)
    for program in table:
        table.end(program.program_id)
    assert len(table) == 0


def test_invalid_bound() -> None:
    with pytest.raises(ValueError, match="max_programs"):
        ProgramTable(max_programs=0)


def test_aborted_request_leaves_the_program_idle_and_evictable() -> None:
    table = ProgramTable(max_programs=2)
    table.arrive("a", 0.0)
    table.request_dropped("a")  # aborted: the program runs nothing any more
    assert table.get("a").state is ProgramState.IDLE
    table.arrive("b", 1.0)
    table.arrive("c", 2.0)  # a is the least recently active program not running
    assert {p.program_id for p in table} == {"b", "c"}


def test_a_program_runs_while_any_of_its_requests_does() -> None:
    table = ProgramTable()
    table.arrive("p", 0.0)
    table.arrive("p", 0.1)  # two requests in flight (parallel calls)
    table.turn_finished("p", 1.0, "ls", 10, pinned=False)
    assert table.get("p").state is ProgramState.RUNNING
    table.request_dropped("p")
    assert table.get("p").state is ProgramState.IDLE


def test_a_million_abandoned_program_ids_stay_bounded() -> None:
    """Clients that abort every request and never send ``last_turn``: eviction is O(1)
    per new program (it scanned every running program), and the table keeps its bound."""
    table = ProgramTable(max_programs=1000)
    for i in range(1_000_000):
        pid = str(i)
        table.arrive(pid, float(i))
        table.request_dropped(pid)
    assert len(table) == 1000
    assert table.get("999999") is not None and table.get("0") is None
