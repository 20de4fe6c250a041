import pytest
from hypothesis import given
from hypothesis import strategies as st

from continuum_tiered.core.hints import (
    HINTS_KEY,
    HintError,
    ProgramHints,
    parse_hints,
    tool_from_reply,
)

tool_names = st.from_regex(r"\A[A-Za-z0-9_.+-]{1,64}\Z")


@given(
    program_id=st.text(min_size=1, max_size=256),
    turn=st.integers(min_value=0, max_value=10**9),
    last_turn=st.booleans(),
    tool=st.none() | tool_names,
)
def test_round_trip(program_id: str, turn: int, last_turn: bool, tool: str | None) -> None:
    hints = ProgramHints(program_id, turn, last_turn, tool)
    assert parse_hints(hints.to_params()) == hints


def test_to_params_omits_missing_tool() -> None:
    assert ProgramHints("p", 3).to_params() == {
        "continuum": {"program_id": "p", "turn": 3, "last_turn": False}
    }


def test_absent_hints() -> None:
    assert parse_hints(None) is None
    assert parse_hints({}) is None
    assert parse_hints({"lmcache.tag": 1}) is None


def test_defaults_and_other_keys_kept_apart() -> None:
    params = {"lmcache.tag": "x", HINTS_KEY: {"program_id": "p", "turn": 0}}
    assert parse_hints(params) == ProgramHints("p", 0, False, None)


def test_any_well_formed_tool_is_accepted() -> None:
    params = {HINTS_KEY: {"program_id": "p", "turn": 1, "tool": "never-seen.tool_2+x"}}
    assert parse_hints(params).tool == "never-seen.tool_2+x"


def _body(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {"program_id": "p", "turn": 1, "last_turn": False, "tool": "ls"}
    for key, value in changes.items():
        if value is _DROP:
            del body[key]
        else:
            body[key] = value
    return {HINTS_KEY: body}


_DROP = object()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([1, 2], "kv_transfer_params"),
        ("continuum", "kv_transfer_params"),
        ({HINTS_KEY: "p"}, "continuum"),
        ({HINTS_KEY: None}, "continuum"),
        (_body(program_id=_DROP), "continuum.program_id"),
        (_body(program_id=""), "continuum.program_id"),
        (_body(program_id=7), "continuum.program_id"),
        (_body(program_id="x" * 257), "continuum.program_id"),
        (_body(turn=_DROP), "continuum.turn"),
        (_body(turn=True), "continuum.turn"),
        (_body(turn=1.0), "continuum.turn"),
        (_body(turn="1"), "continuum.turn"),
        (_body(turn=-1), "continuum.turn"),
        (_body(last_turn=1), "continuum.last_turn"),
        (_body(last_turn="true"), "continuum.last_turn"),
        (_body(tool=""), "continuum.tool"),
        (_body(tool="rm -rf"), "continuum.tool"),
        (_body(tool="a" * 65), "continuum.tool"),
        (_body(tool=3), "continuum.tool"),
        (_body(tool="grep\n"), "continuum.tool"),
        (_body(zeta=1, alpha=2), "continuum.alpha"),
    ],
)
def test_malformed_hints(params: object, field: str) -> None:
    with pytest.raises(HintError) as info:
        parse_hints(params)
    assert info.value.field == field
    assert field in str(info.value)


def test_error_message_names_value_and_expectation() -> None:
    with pytest.raises(HintError, match=r"continuum\.turn: got -3, expected an integer >= 0"):
        parse_hints(_body(turn=-3))


def test_error_message_truncates_long_values() -> None:
    with pytest.raises(HintError) as info:
        parse_hints(_body(program_id="y" * 1000))
    assert "y" * 100 not in str(info.value)
    assert "..." in str(info.value)


def test_unknown_keys_are_all_named() -> None:
    with pytest.raises(HintError, match=r"'alpha', 'zeta'"):
        parse_hints(_body(zeta=1, alpha=2))


def _reply(*commands: str) -> str:
    blocks = "\n".join(f"```bash\n{c}\n```" for c in commands)
    return f"THOUGHT: look around.\n\n{blocks}\n"


@pytest.mark.parametrize(
    ("command", "tool"),
    [
        ("ls -la", "ls"),
        ("cd /repo && grep -rn foo .", "grep"),
        ("cd a; cd b && python3 x.py", "python3"),
        ("cd /repo", "cd"),
        ("FOO=1 BAR=x pytest -q tests", "pytest"),
        ("sudo apt-get install -y x", "apt-get"),
        ("env PYTHONPATH=. time nohup python -m pytest", "python"),
        ("/usr/bin/python script.py", "python"),
        ("./tests/runtests.py sitemaps_tests", "runtests.py"),
        ("cat file | head -n 5", "cat"),
        ("false || echo failed", "false"),
        ("(cd src && make)", "other"),
        ("'weird name' --flag", "other"),
        ("\n\n   nl -ba foo.py | sed -n '1,5p'\nsecond line", "nl"),
        ("FOO=1", None),
        # First lines of replies in the raw mini-swe-agent trajectories.
        ('ls -R | grep ":$" | head -n 5 && grep -r "def model_to_dict" .', "ls"),
        ("cat <<'EOF' > reproduce_issue.py\nprint(1)\nEOF", "cat"),
        ("sed -i '171s/except TypeError:/except (TypeError, ValueError):/' f.py", "sed"),
        ("python3 ./tests/runtests.py utils_tests.test_timesince", "python3"),
    ],
)
def test_tool_from_reply(command: str, tool: str | None) -> None:
    assert tool_from_reply(_reply(command)) == tool


def test_tool_from_reply_needs_exactly_one_bash_block() -> None:
    assert tool_from_reply("THOUGHT: done, no command.") is None
    assert tool_from_reply(_reply("ls", "cat x")) is None
    assert tool_from_reply("```python\nprint(1)\n```") is None
    assert tool_from_reply("```bash\n\n   \n```") is None


@given(st.text(max_size=200))
def test_tool_from_reply_result_is_a_valid_hint(command: str) -> None:
    tool = tool_from_reply(_reply(command))
    if tool is not None:
        assert parse_hints(ProgramHints("p", 0, tool=tool).to_params()).tool == tool
