"""Per-request program hints, carried in the OpenAI body's ``kv_transfer_params``.

Clients put ``{"continuum": {"program_id": ..., "turn": ..., "last_turn": ..., "tool": ...}}``
there. One namespaced key keeps clear of LMCache's ``lmcache.*`` keys and the P/D keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HINTS_KEY = "continuum"
MAX_PROGRAM_ID_LEN = 256
MAX_TURN = 2**31 - 1  # turns beyond a signed 32-bit integer are no agent's
TOOL_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")

_FIELDS = ("program_id", "turn", "last_turn", "tool")
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


def parse_hints(kv_transfer_params: object) -> ProgramHints | None:
    """Read the hints from ``kv_transfer_params``; None when the client sent none."""
    if kv_transfer_params is None:
        return None
    if not isinstance(kv_transfer_params, dict):
        raise HintError("kv_transfer_params", kv_transfer_params, "a JSON object")
    if HINTS_KEY not in kv_transfer_params:
        return None
    body = kv_transfer_params[HINTS_KEY]
    if not isinstance(body, dict):
        raise HintError(HINTS_KEY, body, "a JSON object with keys " + ", ".join(_FIELDS))
    unknown = sorted(str(key) for key in body if key not in _FIELDS)
    if unknown:
        raise HintError(
            f"{HINTS_KEY}.{unknown[0]}",
            unknown,
            "no unknown keys; allowed: " + ", ".join(_FIELDS),
        )

    program_id = body.get("program_id")
    if (
        not isinstance(program_id, str)
        or not 1 <= len(program_id) <= MAX_PROGRAM_ID_LEN
        or not _is_unicode(program_id)
    ):
        raise HintError(
            f"{HINTS_KEY}.program_id",
            program_id,
            f"a non-empty string of at most {MAX_PROGRAM_ID_LEN} Unicode characters "
            "(no lone surrogates)",
        )
    turn = body.get("turn")
    if isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn <= MAX_TURN:
        raise HintError(f"{HINTS_KEY}.turn", turn, f"an integer >= 0 and <= {MAX_TURN}")
    last_turn = body.get("last_turn", False)
    if not isinstance(last_turn, bool):
        raise HintError(f"{HINTS_KEY}.last_turn", last_turn, "true or false")
    tool = body.get("tool")
    if tool is not None and not (isinstance(tool, str) and TOOL_RE.fullmatch(tool)):
        raise HintError(f"{HINTS_KEY}.tool", tool, f"null or a string matching {TOOL_RE.pattern}")
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
