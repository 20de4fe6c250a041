"""Per-request program hints, read from the sources the ecosystem already sends.

Three sources, each giving the whole :class:`ProgramHints` (they are never merged field by
field). Precedence: the first source *present* in a request wins and the ones below it are
not read, so a malformed higher source is an error even when a lower one is well formed:

1. ``kv_transfer_params["continuum"]`` (ours): ``{"program_id": ..., "turn": ...,
   "last_turn": ..., "tool": ...}``. One namespaced key keeps clear of LMCache's
   ``lmcache.*`` keys and the P/D keys.
2. ``Request.kv_hints``, vLLM's ``KvHintsEnvelope`` (``vllm.v1.kv_hints``, since 0.32). The
   envelope has no program, session or tool field of its own (only ``protocol_version``,
   ``message_id`` and a list of versioned, orchestrator-defined actions), so the hints ride
   in one action with ``action_type`` ``"continuum"`` and ``action_version`` ``"1"``, whose
   ``payload`` has the same keys as source 1. Other action types are ignored. vLLM 0.32's
   OpenAI server does not fill ``kv_hints``; it comes from ``LLMEngine``/``AsyncLLM`` callers.
3. ``vllm_xargs`` as the public Continuum plugin's clients send them, which vLLM puts in
   ``SamplingParams.extra_args``: ``job_id`` (program id; a string, or an integer taken as
   its decimal string), ``this_func_call`` (tool of this turn's call), ``last_func_call``
   and ``is_last_step`` (last turn; true/false, or 1/0 since the OpenAI server's
   ``vllm_xargs`` schema turns JSON ``true`` into ``1``). The source is present when any of
   the four keys is; other keys are left to their owners. There is no turn index: ``turn`` is
   1 when ``last_func_call`` names a tool (a returning turn, after a tool call) and 0 when
   it is absent, null or empty. The connector only asks whether ``turn > 0``.

A malformed value in any source raises :class:`HintError` naming its field, e.g.
``continuum.turn``, ``kv_hints.actions[0].payload.turn`` or ``vllm_xargs.job_id``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HINTS_KEY = "continuum"
MAX_PROGRAM_ID_LEN = 256
MAX_TURN = 2**31 - 1  # turns beyond a signed 32-bit integer are no agent's
TOOL_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")

_FIELDS = ("program_id", "turn", "last_turn", "tool")
_FIELD_SET = frozenset(_FIELDS)
KV_HINTS_ACTION_TYPE = HINTS_KEY
KV_HINTS_ACTION_VERSION = "1"
XARGS_PREFIX = "vllm_xargs"
XARGS_KEYS = ("job_id", "this_func_call", "last_func_call", "is_last_step")
_BASH_BLOCK_RE = re.compile(r"```bash[ \t]*\n(.*?)```", re.DOTALL)
_SEPARATOR_RE = re.compile(r"&&|\|\||;|\|")
_ASSIGNMENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PREFIX_WORDS = frozenset({"sudo", "time", "nohup", "env"})


class HintError(ValueError):
    """A malformed hint; ``field`` is its dotted path, e.g. ``continuum.turn``."""

    def __init__(self, field: str, value: object, expected: str) -> None:
        self.field = field
        super().__init__(f"bad hint {field}: got {_short_repr(value)}, expected {expected}")


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class ProgramHints:
    program_id: str
    turn: int
    last_turn: bool = False
    tool: str | None = None

    def to_params(self) -> dict[str, dict[str, object]]:
        """The ``kv_transfer_params`` value that :func:`parse_hints` reads back as ``self``."""
        body: dict[str, object] = {
            "program_id": self.program_id,
            "turn": self.turn,
            "last_turn": self.last_turn,
        }
        if self.tool is not None:
            body["tool"] = self.tool
        return {HINTS_KEY: body}


def parse_hints(
    kv_transfer_params: object, kv_hints: object = None, extra_args: object = None
) -> ProgramHints | None:
    """Read the hints from the first source present, in the module docstring's precedence;
    None when the client sent none. ``kv_hints`` is ``Request.kv_hints``, ``extra_args``
    is ``SamplingParams.extra_args``; left out, only ``kv_transfer_params`` is read."""
    hints = _parse_transfer_params(kv_transfer_params)
    if hints is None:
        hints = parse_kv_hints(kv_hints)
    if hints is None:
        hints = parse_xargs(extra_args)
    return hints


def request_hints(request: Any) -> ProgramHints | None:
    """The hints of a vLLM ``Request``, from every source, in precedence order."""
    params = request.sampling_params
    return parse_hints(
        request.kv_transfer_params,
        kv_hints=getattr(request, "kv_hints", None),  # vLLM >= 0.32
        extra_args=params.extra_args if params is not None else None,
    )


def _parse_transfer_params(kv_transfer_params: object) -> ProgramHints | None:
    if kv_transfer_params is None:
        return None
    if not isinstance(kv_transfer_params, dict):
        raise HintError("kv_transfer_params", kv_transfer_params, "a JSON object")
    if HINTS_KEY not in kv_transfer_params:
        return None
    return _parse_body(kv_transfer_params[HINTS_KEY], HINTS_KEY)


def parse_kv_hints(envelope: object) -> ProgramHints | None:
    """Read the hints from a ``KvHintsEnvelope``'s ``"continuum"`` action, if it has one."""
    if envelope is None:
        return None
    actions = getattr(envelope, "actions", None)
    if not isinstance(actions, (list, tuple)):
        raise HintError("kv_hints.actions", actions, "a list of KvHintAction")
    found: ProgramHints | None = None
    for i, action in enumerate(actions):
        if getattr(action, "action_type", None) != KV_HINTS_ACTION_TYPE:
            continue
        field = f"kv_hints.actions[{i}]"
        if found is not None:
            raise HintError(field, action, f"one {KV_HINTS_ACTION_TYPE!r} action per request")
        version = getattr(action, "action_version", None)
        if version != KV_HINTS_ACTION_VERSION:
            raise HintError(f"{field}.action_version", version, repr(KV_HINTS_ACTION_VERSION))
        found = _parse_body(getattr(action, "payload", None), f"{field}.payload")
    return found


def parse_xargs(extra_args: object) -> ProgramHints | None:
    """Read the Continuum plugin's ``vllm_xargs`` keys from ``SamplingParams.extra_args``."""
    if not isinstance(extra_args, Mapping) or not any(key in extra_args for key in XARGS_KEYS):
        return None
    job_id = extra_args.get("job_id")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    program_id = _check_program_id(job_id, f"{XARGS_PREFIX}.job_id", " (or an integer)")
    tool = _optional_tool(extra_args.get("this_func_call"), f"{XARGS_PREFIX}.this_func_call")
    last_call = _optional_tool(extra_args.get("last_func_call"), f"{XARGS_PREFIX}.last_func_call")
    last_step = extra_args.get("is_last_step", False)
    if last_step is None:
        last_step = False
    if isinstance(last_step, int) and last_step in (0, 1):  # bool is an int too
        last_step = bool(last_step)
    else:
        raise HintError(f"{XARGS_PREFIX}.is_last_step", last_step, "true, false, 1 or 0")
    return ProgramHints(program_id, 0 if last_call is None else 1, last_step, tool)


def _optional_tool(value: object, field: str) -> str | None:
    """A Continuum ``*_func_call``: null and "" mean none; else a valid tool name."""
    if value is None or value == "":
        return None
    if not (isinstance(value, str) and TOOL_RE.fullmatch(value)):
        raise HintError(field, value, f"null, empty or a string matching {TOOL_RE.pattern}")
    return value


def _check_program_id(program_id: object, field: str, also: str = "") -> str:
    if (
        not isinstance(program_id, str)
        or not 1 <= len(program_id) <= MAX_PROGRAM_ID_LEN
        or not _is_unicode(program_id)
    ):
        raise HintError(
            field,
            program_id,
            f"a non-empty string of at most {MAX_PROGRAM_ID_LEN} Unicode characters "
            f"(no lone surrogates){also}",
        )
    return program_id


def _parse_body(body: Any, prefix: str) -> ProgramHints:
    """Parse a ``{"program_id", "turn", "last_turn", "tool"}`` object found at ``prefix``."""
    if not isinstance(body, dict):
        raise HintError(prefix, body, "a JSON object with keys " + ", ".join(_FIELDS))
    if not _FIELD_SET.issuperset(body):
        unknown = sorted(str(key) for key in body if key not in _FIELD_SET)
        raise HintError(
            f"{prefix}.{unknown[0]}",
            unknown,
            "no unknown keys; allowed: " + ", ".join(_FIELDS),
        )
    program_id = _check_program_id(body.get("program_id"), f"{prefix}.program_id")
    turn = body.get("turn")
    if isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn <= MAX_TURN:
        raise HintError(f"{prefix}.turn", turn, f"an integer >= 0 and <= {MAX_TURN}")
    last_turn = body.get("last_turn", False)
    if not isinstance(last_turn, bool):
        raise HintError(f"{prefix}.last_turn", last_turn, "true or false")
    tool = body.get("tool")
    if tool is not None and not (isinstance(tool, str) and TOOL_RE.fullmatch(tool)):
        raise HintError(f"{prefix}.tool", tool, f"null or a string matching {TOOL_RE.pattern}")
    return ProgramHints(program_id, turn, last_turn, tool)


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8: JSON's ``"\\ud800"`` escapes decode to lone
    surrogates, which no log line, metric label or message encoder takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def tool_from_reply(text: str) -> str | None:
    """Name the tool an agent reply invokes, by the rule the traces were labelled with.

    The rule, quoted from ``traces/README.md``: "the reply's single ```bash block; its
    first line split at `&&`, `||`, `;`, `|`; the first part whose first word is not
    `cd`; environment assignments and `sudo`/`time`/`nohup`/`env` skipped; path stripped
    (`/usr/bin/python` -> `python`); a word that is not a plain command name becomes
    `other`."

    None when the reply has no single bash block or the block has no command. A line
    made only of ``cd`` parts names ``cd``. Names are capped at 64 characters (longer
    ones become ``other``) so every result is a valid ``tool`` hint.
    """
    blocks = _BASH_BLOCK_RE.findall(text)
    if len(blocks) != 1:
        return None
    line = next((ln.strip() for ln in blocks[0].splitlines() if ln.strip()), None)
    if line is None:
        return None
    parts = [part.split() for part in _SEPARATOR_RE.split(line)]
    words = next((w for w in parts if w and w[0] != "cd"), None)
    if words is None:
        return "cd" if any(parts) else None
    command = next(
        (w for w in words if not _ASSIGNMENT_RE.match(w) and w not in _PREFIX_WORDS), None
    )
    if command is None:
        return None
    command = command.rsplit("/", 1)[-1]
    return command if TOOL_RE.fullmatch(command) else "other"
