"""The reply a conversation continues with, read from an OpenAI response as it streams by.

The proxy and the server middleware pass the upstream response through unchanged and feed
its bytes here: a JSON body (``choices[0].message`` for chat, ``choices[0].text`` or its
``token_ids`` for completions) or server-sent events (the deltas of ``choices[0]`` joined:
content, and each tool call's name and arguments by index). A response with more than
one choice, an error, or one larger than ``max_bytes`` has no reply (None): the agent's next
turn is then matched by its prompt alone (:mod:`continuum_tiered.core.conversations`).
"""

from __future__ import annotations

import json
from typing import Any

MAX_REPLY_BYTES = 8 * 1024 * 1024


class ReplyReader:
    def __init__(self, kind: str, max_bytes: int = MAX_REPLY_BYTES) -> None:
        if kind not in ("chat", "text", "tokens"):
            raise ValueError(f"unknown prompt kind {kind!r}")
        self.kind = kind
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._too_large = False

    def feed(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._buffer += chunk
        if len(self._buffer) > self.max_bytes:
            self._too_large = True
            self._buffer.clear()

    def reply(self) -> object | None:
        """The reply, once the whole body has been fed; None when there is none to read."""
        if self._too_large:
            return None
        text = self._buffer.decode("utf-8", "replace")
        try:
            choices = _choices(text)
        except ValueError:
            return None
        if not choices or any(c.get("index", 0) != 0 for c in choices):
            return None
        return self._from_choices(choices)

    def _from_choices(self, choices: list[dict[str, Any]]) -> object | None:
        if self.kind == "chat":
            return _chat_reply(choices)
        if self.kind == "text":
            texts = [c.get("text") for c in choices]
            return "".join(texts) if all(isinstance(t, str) for t in texts) else None
        ids = [c.get("token_ids") for c in choices]
        if all(isinstance(i, list) for i in ids):
            return [t for part in ids for t in part]
        return None


def _choices(text: str) -> list[dict[str, Any]]:
    """``choices`` of a JSON body, or of every event of a server-sent event stream."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        return _event_choices(json.loads(stripped))
    choices: list[dict[str, Any]] = []
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data and data != "[DONE]":
            choices += _event_choices(json.loads(data))
    return choices


def _event_choices(event: object) -> list[dict[str, Any]]:
    if not isinstance(event, dict) or "error" in event:
        raise ValueError("an error, not a reply")
    choices = event.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise ValueError("no choices")
    return choices


def _chat_reply(choices: list[dict[str, Any]]) -> dict[str, object] | None:
    if len(choices) == 1 and isinstance(choices[0].get("message"), dict):
        return choices[0]["message"]
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for choice in choices:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        if isinstance(delta.get("content"), str):
            content.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            joined = calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
            joined["name"] += function.get("name") or ""
            joined["arguments"] += function.get("arguments") or ""
    return {
        "role": "assistant",
        "content": "".join(content),
        "tool_calls": [{"function": calls[i]} for i in sorted(calls)],
    }
