"""Program priority and hints for requests that arrive without them, in one place for the
proxy (``continuum-tiered proxy``) and the server middleware (``continuum-tiered serve``).

A completion request's program, first match wins:

1. the client's own hints (``kv_transfer_params.continuum``), kept as sent;
2. the program header (``X-Program-Id`` unless configured otherwise);
3. the body's ``user`` field (the OpenAI API's end-user id, which agent frameworks often
   set to a run or conversation id);
4. the ``session_id`` or ``X-Session-Id`` header;
5. the conversation itself (:mod:`continuum_tiered.core.conversations`): the request is the
   next turn of the conversation it extends, else a new program. Off with
   ``conversations=False``: a request with none of the above is then a one-turn program.

Empty values do not count. Ids longer than the hints allow, or with lone surrogates (which
no hint takes), are replaced by their SHA-256, so they stay distinct.

The request then gets ``priority`` (the program's first arrival, in ms) and hints (program
id, a per-program turn counter, ``last_turn`` from the ``X-Program-Last-Turn: true``
header). Program ids are scoped per client API key (:mod:`continuum_tiered.core.tenancy`)
unless ``scope_programs`` is off, and a ``priority`` the client sent is replaced unless
``trust_client_priority``: no client takes over another's program or its place in line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from continuum_tiered.core.conversations import (
    ConversationError,
    ConversationIndex,
    Prompt,
    prompt_of,
)
from continuum_tiered.core.hints import (
    HINTS_KEY,
    MAX_PROGRAM_ID_LEN,
    HintError,
    ProgramHints,
    parse_hints,
)
from continuum_tiered.core.idle_table import IdleTable
from continuum_tiered.core.reply_reader import ReplyReader
from continuum_tiered.core.request_body import load_json_object
from continuum_tiered.core.tenancy import api_key_scope, scope_xargs, scoped_program_id

DEFAULT_PROGRAM_HEADER = "X-Program-Id"
SESSION_HEADERS = ("session_id", "X-Session-Id")
LAST_TURN_HEADER = "X-Program-Last-Turn"
COMPLETION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def program_priority(first_arrival_s: float) -> int:
    """vLLM's ``priority`` for a program (lower runs first): its first arrival in ms."""
    return int(first_arrival_s * 1000)


def program_identity(
    headers: Mapping[str, str], body: Mapping[str, object], program_header: str
) -> str | None:
    """The explicit program id of a request; ``headers`` must be case-insensitive."""
    candidates = (
        headers.get(program_header),
        body.get("user"),
        *(headers.get(name) for name in SESSION_HEADERS),
    )
    identity = next((c for c in candidates if isinstance(c, str) and c), None)
    if identity is None:
        return None
    try:
        encoded = identity.encode()
    except UnicodeEncodeError:  # lone surrogates (a JSON "\ud800"): no valid hint takes them
        return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
    if len(identity) > MAX_PROGRAM_ID_LEN:
        return hashlib.sha256(encoded).hexdigest()
    return identity


@dataclass
class TrackedProgram:
    first_arrival_s: float
    last_seen_s: float
    next_turn: int = 0


class ProgramRegistry:
    """Programs seen in the last ``idle_timeout_s``, at most ``max_programs`` of them.

    Nothing says when an agent is done, so a program is forgotten once it has sent nothing
    for ``idle_timeout_s`` (or, beyond ``max_programs``, the least recently seen one is). A
    forgotten program that comes back starts over: turn 0 and a new first arrival. Its KV
    pin upstream does not depend on this table: the connector drops every pin at its TTL
    deadline, or sooner under memory pressure.
    """

    def __init__(self, idle_timeout_s: float, max_programs: int = 100_000) -> None:
        self._programs: IdleTable[TrackedProgram] = IdleTable(
            idle_timeout_s, max_programs, "max_programs"
        )

    def __len__(self) -> int:
        return len(self._programs)

    def next_turn(
        self, program_id: str, now_s: float, last_turn: bool = False
    ) -> tuple[float, int]:
        """Record a request of the program; returns (its first arrival in s, this turn).

        After a last turn the program is forgotten: its id may start a new program.
        """
        self._programs.forget_idle(now_s)
        program = self._programs.pop(program_id)
        if program is None:
            self._programs.make_room()
            program = TrackedProgram(first_arrival_s=now_s, last_seen_s=now_s)
        turn = program.next_turn
        program.next_turn += 1
        if not last_turn:
            self._programs.touch(program_id, program, now_s)
        return program.first_arrival_s, turn


@dataclass(frozen=True)
class TaggingOptions:
    program_header: str = DEFAULT_PROGRAM_HEADER
    idle_timeout_s: float = 600.0
    max_programs: int = 100_000
    scope_programs: bool = True  # program ids per client API key
    trust_client_priority: bool = False
    conversations: bool = True  # identity from the conversation when nothing names one
    max_conversations: int = 10_000


@dataclass(frozen=True)
class OpenTurn:
    """A request whose program was found from its conversation; ``finish`` it with its
    reply so the program's next turn can extend prompt + reply."""

    program_id: str  # unscoped: the conversation index's own id
    prompt: Prompt


@dataclass(frozen=True)
class Tagged:
    body: bytes  # as it came (the same object) when nothing changed
    program_id: str | None  # the (scoped) program the request belongs to, if any
    open_turn: OpenTurn | None = None


class ProgramTagger:
    def __init__(self, options: TaggingOptions) -> None:
        self.options = options
        self.programs = ProgramRegistry(options.idle_timeout_s, options.max_programs)
        self.conversations = (
            ConversationIndex(options.idle_timeout_s, options.max_conversations)
            if options.conversations
            else None
        )

    def tag(
        self, body: bytes, headers: Mapping[str, str], now_s: float, completion: bool = True
    ) -> Tagged:
        """The request to send on, for one that arrived at ``now_s``.

        ``headers`` must be case-insensitive. ``completion``: a completion request, whose
        program is found and given hints; other requests only have a client's ``priority``
        replaced and its hints scoped. A body that is not a JSON object goes on as it came
        (the server answers it in its own words). Hints the client sent that are malformed
        go on as they are, for the server to reject (or its connector to ignore). Raises
        :class:`~continuum_tiered.core.request_body.BodyError` for a body to answer with
        HTTP 400.
        """
        payload = load_json_object(body)
        if payload is None:
            return Tagged(body, None)
        return self.tag_payload(payload, body, headers, now_s, completion)

    def tag_payload(
        self,
        payload: dict[str, object],
        body: bytes,
        headers: Mapping[str, str],
        now_s: float,
        completion: bool = True,
    ) -> Tagged:
        """:meth:`tag` for a body already read as the JSON object ``payload`` (changed in
        place), so that a caller that has parsed it does not parse it again."""
        options = self.options
        scope = api_key_scope(headers.get("authorization")) if options.scope_programs else None
        keep_priority = options.trust_client_priority and "priority" in payload
        params = payload.get("kv_transfer_params")
        first_arrival_s: float | None = None
        program_id: str | None = None
        open_turn: OpenTurn | None = None
        changed = False
        if params is not None and (not isinstance(params, dict) or HINTS_KEY in params):
            # The client's own hints: scoped when well formed, else left for the server.
            try:
                client_hints = parse_hints(params)
            except HintError:
                client_hints = None
            if client_hints is not None:
                hints = _scoped(client_hints, scope)
                program_id = hints.program_id
                first_arrival_s, _ = self.programs.next_turn(program_id, now_s, hints.last_turn)
                payload["kv_transfer_params"] = {**params, **hints.to_params()}
                changed = True
        elif completion:
            found = program_identity(headers, payload, options.program_header)
            if found is None:
                open_turn = self._open_turn(payload, scope or "", now_s)
                found = open_turn.program_id if open_turn else None
            if found is not None:
                program_id = found if scope is None else scoped_program_id(scope, found)
                last_turn = headers.get(LAST_TURN_HEADER, "").strip().lower() == "true"
                first_arrival_s, turn = self.programs.next_turn(program_id, now_s, last_turn)
                hints = ProgramHints(program_id, turn, last_turn=last_turn)
                payload["kv_transfer_params"] = {**(params or {}), **hints.to_params()}
                changed = True
        if scope is not None and scope_xargs(payload, scope):
            changed = True  # the Continuum plugin's hints name programs too
        # Other paths get a priority only in place of the client's: not every one takes it.
        if not keep_priority and (completion or "priority" in payload):
            arrival_s = now_s if first_arrival_s is None else first_arrival_s
            payload["priority"] = program_priority(arrival_s)
            changed = True
        return Tagged(json.dumps(payload).encode() if changed else body, program_id, open_turn)

    def finish(self, open_turn: OpenTurn, reply: object | None, now_s: float) -> None:
        """The request of ``open_turn`` ended with ``reply`` (None: none could be read)."""
        if self.conversations is not None:
            try:
                self.conversations.finish(open_turn.program_id, open_turn.prompt, reply, now_s)
            except ConversationError:  # a reply of another shape: the prompt key remains
                self.conversations.finish(open_turn.program_id, open_turn.prompt, None, now_s)

    def _open_turn(
        self, payload: Mapping[str, object], namespace: str, now_s: float
    ) -> OpenTurn | None:
        """A conversation's turn, within the client's scope: conversations of two API keys
        never continue each other, however alike their prompts."""
        if self.conversations is None:
            return None
        try:
            prompt = prompt_of(payload, namespace)
        except ConversationError:
            return None  # the server answers a malformed prompt; no program for it
        return OpenTurn(self.conversations.begin(prompt, now_s), prompt)


class ResponseWatch:
    """Reads an open turn's response as it passes, and ends the turn *before* the last
    byte goes to the client: an agent sends its next turn the moment the reply arrives,
    and it must find its conversation no longer in flight."""

    def __init__(self, tagger: ProgramTagger, turn: OpenTurn) -> None:
        self.tagger = tagger
        self.turn = turn
        self.reader = ReplyReader(turn.prompt.kind)
        self.ok = True
        self.ended = False

    def status(self, code: int) -> None:
        self.ok = code == 200

    def body(self, chunk: bytes, last: bool) -> None:
        if self.ok:
            self.reader.feed(chunk)
        if last:
            self.end()

    def end(self) -> None:
        """End the turn (idempotent); without the whole of a 200 body, with no reply."""
        if not self.ended:
            self.ended = True
            reply = self.reader.reply() if self.ok else None
            self.tagger.finish(self.turn, reply, time.time())


def _scoped(hints: ProgramHints, scope: str | None) -> ProgramHints:
    if scope is None:
        return hints
    return dataclasses.replace(hints, program_id=scoped_program_id(scope, hints.program_id))
