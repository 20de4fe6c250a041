"""Program identity from the conversation itself, for agents that send no program id.

An agent's context grows by appending: turn t+1's prompt is turn t's prompt, then turn t's
reply, then what the tools returned. So a request is the next turn of a known program when
that program's last prompt and reply are a prefix of it, and a new program otherwise.

:class:`ConversationIndex` keeps, for each live conversation, the keys of its last prompt
and of its last prompt + reply (a digest of the prefix and its length). A request is
matched to the conversation that owns its longest registered proper prefix; a request
that matches nothing, or only its own full length (an identical prompt: a second run of
the same task, or a client retry), starts a new conversation.

Two kinds of prompt:

- chat (``messages``): the prefixes are whole messages. Each message is reduced to what an
  agent echoes back (role, text, tool calls' names and arguments; no ids, no formatting of
  the JSON), and the prefix digests are chained, so matching costs one hash over the prompt
  and one dictionary lookup per message;
- flat (a completion's text or token ids): any length can be a turn boundary. A rolling
  polynomial hash over the units (mod 2^64) finds the candidate lengths in one pass, and
  each candidate is confirmed with a BLAKE2 digest of the prefix, so a collision of the
  cheap hash never merges two conversations.

Agents that start alike (the same system prompt and task, several runs of one task): until
their replies differ their requests are the same tokens, so which of them a request is
assigned to changes nothing the engine sees (same prefix, same KV). A conversation with a
request in flight takes no other request (an agent waits for its reply), so two such runs
sending at once stay two programs; once their replies differ, their keys differ and each
turn finds its own conversation. A conversation that rewrites its history (a summary
replacing old turns) no longer extends its prefix and starts a new program.

Bounded: at most ``max_conversations`` (least recently active forgotten first), and none
idle for longer than ``idle_timeout_s``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from continuum_tiered.core.idle_table import IdleTable

DIGEST_BYTES = 16
# Flat prompts past this many characters or tokens get no identity (a one-turn program):
# the cheap hashes take 8 bytes a unit, and no model's context holds more.
MAX_FLAT_UNITS = 2_000_000
_BASE = 0x100000001B3  # odd, so invertible mod 2^64: prefix hashes come from one cumsum
_BASE_INVERSE = pow(_BASE, -1, 2**64)
_LENGTH_MIX = 0x9E3779B97F4A7C15  # spreads the length over the cheap key


class ConversationError(ValueError):
    """A prompt whose shape no conversation can be read from."""


@dataclass(frozen=True)
class PrefixKey:
    namespace: str  # e.g. the client's API key scope: conversations of two never meet
    kind: str  # "chat", "text" or "tokens": prompts of different kinds never match
    length: int  # messages, characters or tokens
    digest: bytes
    weak: int | None = None  # flat prompts: the cheap hash that finds this length


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


# ----------------------------------------------------------------------------- chat


def _text_of(content: object) -> object:
    """A message's content as an agent echoes it: a string, or the list of its parts.

    Clients turn ``"text"`` into ``[{"type": "text", "text": "text"}]`` and back (LiteLLM
    does), so an all-text list is its joined text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            return "".join(str(p.get("text", "")) for p in content)
        return content
    raise ConversationError(f"message content must be a string or a list, not {content!r:.60}")


def _arguments(arguments: object) -> object:
    """Tool-call arguments as their JSON value, so re-serialising them does not matter."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def canonical_message(message: object) -> bytes:
    """What identifies a message across turns: role, text and tool calls (name and
    arguments); ids, names and any other field a client may add or drop are left out."""
    if not isinstance(message, Mapping):
        raise ConversationError(f"a message must be an object, not {message!r:.60}")
    calls = []
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise ConversationError(f"a tool call needs a function object: {call!r:.60}")
        calls.append([function.get("name"), _arguments(function.get("arguments"))])
    record = [message.get("role"), _text_of(message.get("content")), calls]
    return json.dumps(record, ensure_ascii=False, sort_keys=True, default=str).encode()


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request's messages, as chained digests of their prefixes."""

    chain: tuple[bytes, ...]  # chain[k - 1]: digest of the first k messages
    namespace: str = ""
    kind = "chat"

    @classmethod
    def of(cls, messages: object, namespace: str = "") -> ChatPrompt:
        if not isinstance(messages, list) or not messages:
            raise ConversationError("messages must be a non-empty list")
        return cls(tuple(_chained(b"", (canonical_message(m) for m in messages))), namespace)

    @property
    def length(self) -> int:
        return len(self.chain)

    def key(self, length: int) -> PrefixKey:
        return PrefixKey(self.namespace, self.kind, length, self.chain[length - 1])

    def candidate_keys(self, registered_weak: np.ndarray) -> Iterator[PrefixKey]:
        """Every proper prefix, longest first (one lookup each)."""
        return (self.key(length) for length in range(self.length - 1, 0, -1))

    def extended(self, reply: object) -> ChatPrompt:
        """The prompt followed by the reply message."""
        last = self.chain[-1]
        chain = (*self.chain, *_chained(last, [canonical_message(reply)]))
        return ChatPrompt(chain, self.namespace)


def _chained(previous: bytes, records: Iterator[bytes] | Sequence[bytes]) -> Iterator[bytes]:
    for record in records:
        previous = _digest(previous + _digest(record))
        yield previous


# ----------------------------------------------------------------------------- flat


def _weak_prefix_keys(units: np.ndarray) -> np.ndarray:
    """``keys[i - 1]``: a cheap hash of ``units[:i]`` mixed with ``i``, for every ``i``
    (a polynomial hash mod 2^64, from one cumulative sum: H_i = B^(i-1) * sum u_j B^-j)."""
    n = len(units)
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(n, _BASE, dtype=np.uint64), dtype=np.uint64)
        inverse_powers = np.cumprod(np.full(n, _BASE_INVERSE, dtype=np.uint64), dtype=np.uint64)
        sums = np.cumsum(units.astype(np.uint64) * inverse_powers, dtype=np.uint64)
        lengths = np.arange(1, n + 1, dtype=np.uint64)
        return sums * powers + lengths * np.uint64(_LENGTH_MIX)


@dataclass(frozen=True)
class FlatPrompt:
    """A completion's prompt: its characters (``text``) or token ids (``tokens``)."""

    kind: str
    units: np.ndarray
    weak: np.ndarray = field(repr=False)
    namespace: str = ""

    @classmethod
    def of(cls, prompt: object, namespace: str = "") -> FlatPrompt:
        if isinstance(prompt, str) and prompt:
            return cls._build("text", _code_points(prompt), namespace)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            return cls._build("tokens", np.asarray(prompt, dtype=np.uint64), namespace)
        raise ConversationError("prompt must be a non-empty string or list of token ids")

    @classmethod
    def _build(cls, kind: str, units: np.ndarray, namespace: str) -> FlatPrompt:
        if len(units) > MAX_FLAT_UNITS:
            raise ConversationError(
                f"a {kind} prompt of {len(units)} units is past the {MAX_FLAT_UNITS} "
                "the conversation index reads"
            )
        return cls(kind, units, _weak_prefix_keys(units), namespace)

    @property
    def length(self) -> int:
        return len(self.units)

    def key(self, length: int) -> PrefixKey:
        digest = _digest(self.units[:length].tobytes())
        weak = int(self.weak[length - 1])
        return PrefixKey(self.namespace, self.kind, length, digest, weak)

    def candidate_keys(self, registered_weak: np.ndarray) -> Iterator[PrefixKey]:
        """The proper prefixes whose cheap key is registered, longest first; the digest
        in each key confirms it when the caller looks it up."""
        hits = np.flatnonzero(np.isin(self.weak[:-1], registered_weak))
        return (self.key(int(i) + 1) for i in hits[::-1])

    def extended(self, reply: object) -> FlatPrompt:
        """The prompt followed by the completion (text for text, token ids for tokens)."""
        if self.kind == "text" and isinstance(reply, str):
            tail = _code_points(reply)
        elif self.kind == "tokens" and isinstance(reply, list):
            tail = np.asarray(reply, dtype=np.uint64)
        else:
            raise ConversationError(f"a {self.kind} prompt cannot be extended by {reply!r:.60}")
        return self._build(self.kind, np.concatenate([self.units, tail]), self.namespace)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


Prompt = ChatPrompt | FlatPrompt


def prompt_of(body: Mapping[str, object], namespace: str = "") -> Prompt:
    """The conversation of an OpenAI chat or completions request body; only prompts of one
    ``namespace`` continue each other."""
    if "messages" in body:
        return ChatPrompt.of(body["messages"], namespace)
    if "prompt" in body:
        return FlatPrompt.of(body["prompt"], namespace)
    raise ConversationError("the body has neither messages nor prompt")


# ---------------------------------------------------------------------------- index


@dataclass
class Conversation:
    program_id: str
    last_seen_s: float
    keys: list[PrefixKey] = field(default_factory=list)
    in_flight: bool = False


class ConversationIndex:
    """Live conversations and the prefix keys that lead to them."""

    def __init__(
        self, idle_timeout_s: float, max_conversations: int = 10_000, id_prefix: str = "conv-"
    ) -> None:
        self._conversations: IdleTable[Conversation] = IdleTable(
            idle_timeout_s, max_conversations, "max_conversations", on_forget=self._unregister
        )
        # A random part keeps ids of two proxies (or a restarted one) apart upstream.
        self._id_prefix = f"{id_prefix}{secrets.token_hex(4)}-"
        self._ids = itertools.count()
        self._owners: dict[PrefixKey, list[str]] = {}
        self._weak: dict[int, int] = {}  # a flat PrefixKey's cheap hash -> keys holding it
        self._weak_array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._conversations)

    def begin(self, prompt: Prompt, now_s: float) -> str:
        """The program id of a request with this prompt (a new one when none extends)."""
        self._conversations.forget_idle(now_s)
        conversation = self._match(prompt) or self._new(now_s)
        self._unregister(conversation)
        self._register(conversation, prompt, prompt.length)
        conversation.in_flight = True
        self._conversations.touch(conversation.program_id, conversation, now_s)
        return conversation.program_id

    def finish(self, program_id: str, prompt: Prompt, reply: object | None, now_s: float) -> None:
        """The request of ``program_id`` returned ``reply`` (None: no usable reply, e.g.
        an error or several choices): its next turn may now extend prompt + reply."""
        conversation = self._conversations.get(program_id)
        if conversation is None:
            return
        conversation.in_flight = False
        conversation.last_seen_s = now_s
        if reply is not None:
            extended = prompt.extended(reply)
            self._register(conversation, extended, extended.length)

    def _match(self, prompt: Prompt) -> Conversation | None:
        for key in prompt.candidate_keys(self._registered_weak()):
            for program_id in self._owners.get(key, ()):
                conversation = self._conversations.get(program_id)
                if conversation is not None and not conversation.in_flight:
                    return conversation
        return None

    def _new(self, now_s: float) -> Conversation:
        self._conversations.make_room()
        return Conversation(f"{self._id_prefix}{next(self._ids)}", now_s)

    def _register(self, conversation: Conversation, prompt: Prompt, length: int) -> None:
        key = prompt.key(length)
        self._owners.setdefault(key, []).append(conversation.program_id)
        conversation.keys.append(key)
        if key.weak is not None:
            self._weak[key.weak] = self._weak.get(key.weak, 0) + 1
            self._weak_array = None

    def _unregister(self, conversation: Conversation) -> None:
        for key in conversation.keys:
            owners = self._owners[key]
            owners.remove(conversation.program_id)
            if not owners:
                del self._owners[key]
            if key.weak is not None:
                self._weak[key.weak] -= 1
                if not self._weak[key.weak]:
                    del self._weak[key.weak]
                self._weak_array = None
        conversation.keys.clear()

    def _registered_weak(self) -> np.ndarray:
        if self._weak_array is None:
            self._weak_array = np.fromiter(self._weak, dtype=np.uint64, count=len(self._weak))
        return self._weak_array
