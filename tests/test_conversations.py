"""Program identity from the conversation: which requests form one program, which do not."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from continuum_tiered.core.conversations import (
    ChatPrompt,
    ConversationError,
    ConversationIndex,
    FlatPrompt,
    prompt_of,
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant that can run bash."}
TASK = {"role": "user", "content": "Fix the failing test in repo/."}


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def observation(text: str) -> dict:
    return {"role": "user", "content": f"<output>{text}</output>"}


class Agent:
    """A sequential chat agent: each turn sends everything so far, appends the reply."""

    def __init__(self, index: ConversationIndex, replies: list[str], first=(SYSTEM, TASK)):
        self.index = index
        self.messages = list(first)
        self.replies = iter(replies)
        self.pending: tuple[str, ChatPrompt, str] | None = None

    def send(self, now_s: float = 0.0) -> str:
        prompt = ChatPrompt.of(self.messages)
        program = self.index.begin(prompt, now_s)
        self.pending = (program, prompt, next(self.replies))
        return program

    def receive(self, now_s: float = 0.0, tool_output: str = "ok") -> None:
        program, prompt, text = self.pending
        self.index.finish(program, prompt, reply(text), now_s)
        self.messages += [reply(text), observation(tool_output)]

    def turn(self, now_s: float = 0.0, tool_output: str = "ok") -> str:
        program = self.send(now_s)
        self.receive(now_s, tool_output)
        return program


def test_an_agents_turns_are_one_program():
    index = ConversationIndex(idle_timeout_s=600)
    agent = Agent(index, [f"step {i}" for i in range(6)])
    assert len({agent.turn(now_s=i) for i in range(6)}) == 1
    assert len(index) == 1


def test_two_agents_with_the_same_start_stay_two_once_they_diverge():
    index = ConversationIndex(idle_timeout_s=600)
    a = Agent(index, ["ls", "cat a.py", "edit a.py"])
    b = Agent(index, ["ls", "cat b.py", "edit b.py"])
    # Turn 0 and 1 are identical until the replies differ; both send at once, so the
    # one in flight cannot take the other's request.
    first_a, first_b = a.send(), b.send()
    assert first_a != first_b
    a.receive(tool_output="a.py b.py")
    b.receive(tool_output="a.py b.py")
    later_a = [a.turn(tool_output=f"a{i}") for i in range(2)]
    later_b = [b.turn(tool_output=f"b{i}") for i in range(2)]
    assert len(set(later_a)) == 1 and len(set(later_b)) == 1
    assert set(later_a) != set(later_b)
    assert {first_a, first_b} == set(later_a) | set(later_b)


def test_an_identical_prompt_is_a_new_program_not_a_turn():
    index = ConversationIndex(idle_timeout_s=600)
    a = Agent(index, ["ls"])
    first = a.turn()
    again = index.begin(ChatPrompt.of([SYSTEM, TASK]), 1.0)  # same task, second run
    assert again != first


def test_a_rewritten_history_starts_a_new_program():
    index = ConversationIndex(idle_timeout_s=600)
    agent = Agent(index, ["ls", "cat", "edit"])
    program = agent.turn()
    agent.turn()
    agent.messages = [SYSTEM, {"role": "user", "content": "Summary so far: listed, read."}]
    assert agent.turn() != program


def test_the_reply_may_come_back_reserialised():
    """Clients echo the reply as parts, drop ids, re-serialise tool-call arguments."""
    index = ConversationIndex(idle_timeout_s=600)
    prompt = ChatPrompt.of([SYSTEM, TASK])
    program = index.begin(prompt, 0.0)
    sent = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "bash", "arguments": '{"cmd": "ls",  "timeout": 5}'}},
        ],
    }  # fmt: skip
    index.finish(program, prompt, sent, 0.0)
    echoed = {
        "role": "assistant",
        "content": [],
        "tool_calls": [
            {"id": "other", "function": {"name": "bash", "arguments": '{"timeout":5,"cmd":"ls"}'}}
        ],
    }
    tool = {"role": "tool", "tool_call_id": "other", "content": [{"type": "text", "text": "a"}]}
    assert index.begin(ChatPrompt.of([SYSTEM, TASK, echoed, tool]), 1.0) == program


def test_without_the_reply_the_prompt_still_leads_to_the_program():
    """A reply the proxy could not read (an error, several choices) still lets the next
    turn extend the prompt."""
    index = ConversationIndex(idle_timeout_s=600)
    prompt = ChatPrompt.of([SYSTEM, TASK])
    program = index.begin(prompt, 0.0)
    index.finish(program, prompt, None, 0.0)
    assert index.begin(ChatPrompt.of([SYSTEM, TASK, reply("x"), observation("y")]), 1.0) == program


def test_idle_conversations_are_forgotten():
    index = ConversationIndex(idle_timeout_s=10)
    agent = Agent(index, ["ls", "cat"])
    program = agent.turn(now_s=0)
    assert agent.turn(now_s=11) != program
    assert len(index) == 1


def test_memory_is_bounded_and_the_least_recent_goes_first():
    index = ConversationIndex(idle_timeout_s=600, max_conversations=3)
    agents = [Agent(index, ["a", "b"], first=(SYSTEM, {"role": "user", "content": f"task {i}"}))
              for i in range(4)]  # fmt: skip
    programs = [agent.turn(now_s=i) for i, agent in enumerate(agents)]
    assert len(index) == 3
    assert agents[0].turn(now_s=5) != programs[0]  # forgotten: starts over
    assert agents[3].turn(now_s=6) == programs[3]


def test_many_conversations_keep_their_identity():
    index = ConversationIndex(idle_timeout_s=600)
    agents = [Agent(index, [f"r{i}.{t}" for t in range(4)],
                    first=(SYSTEM, {"role": "user", "content": f"task {i % 7}"}))
              for i in range(50)]  # fmt: skip
    seen: dict[int, set[str]] = {i: set() for i in range(50)}
    for turn in range(4):
        for i, agent in enumerate(agents):
            seen[i].add(agent.turn(now_s=turn, tool_output=f"{i}.{turn}"))
    assert all(len(ids) == 1 for ids in seen.values())
    assert len(set.union(*seen.values())) == 50


@pytest.mark.parametrize(
    ("prompt", "completion", "follow_up"),
    [
        ("Q: list files\nA:", " ls -la", "\nObservation: a.py\nA:"),
        ([1, 2, 3, 4], [5, 6], [7, 8]),
    ],
)
def test_completion_prompts_extend_by_the_completion(prompt, completion, follow_up):
    index = ConversationIndex(idle_timeout_s=600)
    first = FlatPrompt.of(prompt)
    program = index.begin(first, 0.0)
    index.finish(program, first, completion, 0.0)
    different = FlatPrompt.of(prompt[::-1])
    index.finish(index.begin(different, 0.0), different, None, 0.0)
    assert index.begin(FlatPrompt.of(prompt + completion + follow_up), 1.0) == program


def test_conversations_of_two_namespaces_never_continue_each_other():
    """Two API keys running the same task with the same replies stay apart."""
    index = ConversationIndex(idle_timeout_s=600)
    first = ChatPrompt.of([SYSTEM, TASK], namespace="key-a")
    program = index.begin(first, 0.0)
    index.finish(program, first, reply("ls"), 0.0)
    follow_up = [SYSTEM, TASK, reply("ls"), observation("a.py")]
    assert index.begin(ChatPrompt.of(follow_up, namespace="key-b"), 1.0) != program
    assert index.begin(ChatPrompt.of(follow_up, namespace="key-a"), 1.0) == program


def test_text_and_token_prompts_never_match_each_other():
    index = ConversationIndex(idle_timeout_s=600)
    text = FlatPrompt.of("ab")
    program = index.begin(text, 0.0)
    index.finish(program, text, None, 0.0)
    assert index.begin(FlatPrompt.of([97, 98, 99]), 0.0) != program


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 50), min_size=1, max_size=40),
    tail=st.lists(st.integers(0, 50), min_size=1, max_size=40),
)
def test_a_flat_prompt_matches_exactly_the_programs_it_extends(prefix, tail):
    """Only a real prefix matches: the cheap hash finds candidates, the digest decides."""
    index = ConversationIndex(idle_timeout_s=600)
    registered = FlatPrompt.of(prefix)
    program = index.begin(registered, 0.0)
    index.finish(program, registered, None, 0.0)
    request = prefix + tail
    assert (index.begin(FlatPrompt.of(request), 0.0) == program) is True
    unrelated = [t + 51 for t in request]  # shares no unit with the prefix
    assert index.begin(FlatPrompt.of(unrelated), 0.0) != program


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": []},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": ["not a message"]},
        {"messages": [{"role": "assistant", "tool_calls": [{"function": "bash"}]}]},
        {"prompt": ""},
        {"prompt": [1, -2]},
        {"prompt": [[1, 2], [3]]},
        {"prompt": [True, 1]},
    ],
)
def test_bad_prompts_name_the_problem(body):
    with pytest.raises(ConversationError):
        prompt_of(body)


def test_a_flat_prompt_past_the_limit_gets_no_identity(monkeypatch):
    monkeypatch.setattr("continuum_tiered.core.conversations.MAX_FLAT_UNITS", 10)
    FlatPrompt.of("x" * 10)
    with pytest.raises(ConversationError, match="past the 10"):
        FlatPrompt.of("x" * 11)
    with pytest.raises(ConversationError, match="past the 10"):
        FlatPrompt.of("x" * 6).extended("y" * 5)


def test_invalid_limits_are_refused():
    with pytest.raises(ValueError, match="idle timeout"):
        ConversationIndex(idle_timeout_s=0)
    with pytest.raises(ValueError, match="max_conversations"):
        ConversationIndex(idle_timeout_s=1, max_conversations=0)
