"""Reading the reply out of JSON and streamed OpenAI responses, fed in arbitrary pieces."""

from __future__ import annotations

import json

import pytest

from continuum_tiered.core.conversations import ChatPrompt
from continuum_tiered.core.reply_reader import ReplyReader


def events(*payloads: dict) -> bytes:
    return b"".join(f"data: {json.dumps(p)}\n\n".encode() for p in payloads) + b"data: [DONE]\n\n"


def read(kind: str, body: bytes, piece: int = 7, max_bytes: int = 1 << 20) -> object:
    reader = ReplyReader(kind, max_bytes=max_bytes)
    for start in range(0, len(body), piece):
        reader.feed(body[start : start + piece])
    return reader.reply()


def test_a_chat_json_reply_is_its_message():
    message = {"role": "assistant", "content": "ls -la", "tool_calls": []}
    body = json.dumps({"choices": [{"index": 0, "message": message}]}).encode()
    assert read("chat", body) == message


def test_a_streamed_chat_reply_joins_content_and_tool_calls():
    body = events(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me "}}]},
        {"choices": [{"index": 0, "delta": {"content": "look."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "bash", "arguments": '{"cmd":'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": ' "ls"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    )  # fmt: skip
    streamed = read("chat", body)
    echoed = {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [{"id": "c1", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}],
    }
    # What the agent sends back as the next turn's message continues the same conversation.
    base = ChatPrompt.of([{"role": "user", "content": "go"}])
    assert base.extended(streamed) == base.extended(echoed)


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        ("text", {"choices": [{"index": 0, "text": " ls"}]}, " ls"),
        ("tokens", {"choices": [{"index": 0, "text": "x", "token_ids": [5, 6]}]}, [5, 6]),
        ("tokens", {"choices": [{"index": 0, "text": "x"}]}, None),  # ids not asked for
    ],
)
def test_completion_replies(kind, body, expected):
    assert read(kind, json.dumps(body).encode()) == expected


def test_streamed_completion_text_is_joined():
    body = events(
        {"choices": [{"index": 0, "text": "ab"}]}, {"choices": [{"index": 0, "text": "c"}]}
    )
    assert read("text", body) == "abc"


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"error": {"message": "too long", "code": 400}}).encode(),
        json.dumps({"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}).encode(),
        b"data: {not json\n\n",
        b"Internal Server Error",
        b"",
    ],
)
def test_no_reply_from_errors_several_choices_or_garbage(body):
    assert read("text", body) is None


def test_a_reply_past_the_size_limit_is_dropped():
    body = json.dumps({"choices": [{"index": 0, "text": "x" * 1000}]}).encode()
    assert read("text", body, max_bytes=100) is None


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown prompt kind"):
        ReplyReader("audio")
