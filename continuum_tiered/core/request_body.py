"""Reading a client's JSON request body before the server does, whatever the client sent.

The server's middleware (:mod:`continuum_tiered.vllm.middleware`) and the proxy
(:mod:`continuum_tiered.client.proxy.app`) both parse bodies to find the hints. A body is either

- rejected here with :class:`BodyError` (HTTP 400 naming the problem): nested deeper than
  :data:`MAX_JSON_DEPTH` levels (Python's parser would raise ``RecursionError`` a few
  hundred levels further down), holding ``NaN``, ``Infinity`` or a number beyond a float's
  range (none is a JSON number; Python's parser takes them), or an integer of more digits
  than Python converts (4300);
- not a JSON object (not JSON, not UTF-8, an array, a string...): :func:`load_json_object`
  returns None and the body goes on untouched, for the server to answer in its own words;
- a JSON object, whose hints :func:`request_error` checks.

Nothing here raises anything but :class:`BodyError` on any input.
"""

from __future__ import annotations

import json
import math
import sys

from continuum_tiered.core.hints import XARGS_PREFIX, HintError, parse_hints

MAX_JSON_DEPTH = 128


class BodyError(ValueError):
    """A request body answered with HTTP 400 before it reaches the server's own parser."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


def nesting_exceeds(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON value nests arrays and objects deeper than ``limit``.

    Level by level, without recursion; each element is looked at once (about as long as
    parsing took, for a body of millions of small arrays).
    """
    level = [value] if _is_container(value) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if _is_container(child)
        ]
    return False


def _is_container(value: object) -> bool:
    return type(value) is dict or type(value) is list


def _reject_constant(name: str) -> float:
    raise BodyError(f"request body holds {name}, which is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise BodyError(f"request body holds the number {shown}, beyond a float's range")
    return value


def load_json_object(body: bytes) -> dict[str, object] | None:
    """``body`` as a JSON object; None when it is not one (the server answers those).

    Raises :class:`BodyError` for a body too deep, or with a number no JSON parser should
    accept; see the module's docstring.
    """
    try:
        payload = json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except BodyError:
        raise
    except RecursionError as err:  # Python's parser gives up around 1000 levels
        raise _too_deep() from err
    except ValueError as err:
        if "integer string conversion" in str(err):  # valid JSON that Python refuses
            raise BodyError(
                f"request body holds an integer of over {sys.get_int_max_str_digits()} digits"
            ) from err
        return None  # not JSON, or not UTF-8/16/32
    if nesting_exceeds(payload):
        raise _too_deep()
    return payload if isinstance(payload, dict) else None


def _too_deep() -> BodyError:
    return BodyError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")


def check_body_hints(payload: dict[str, object]) -> None:
    """Raise :class:`HintError` for malformed hints in any source of a body the connector
    reads: ours (``kv_transfer_params``) and the Continuum plugin's (``vllm_xargs``)."""
    parse_hints(payload.get("kv_transfer_params"), extra_args=payload.get("vllm_xargs"))


def request_error(body: bytes) -> BodyError | HintError | None:
    """What is wrong with a request body, for an HTTP 400; None when nothing is for us to say."""
    try:
        payload = load_json_object(body)
    except BodyError as err:
        return err
    if payload is None:
        return None
    try:
        check_body_hints(payload)
    except HintError as err:
        return err
    return None


def error_param(error: BodyError | HintError) -> str | None:
    """The ``param`` of the error reply: the field at fault, as the OpenAI API names it."""
    if isinstance(error, BodyError):
        return error.param
    param = error.field
    if param.startswith(("kv_transfer_params", XARGS_PREFIX)):
        return param
    return f"kv_transfer_params.{param}"


def error_message(error: BodyError | HintError) -> str:
    if isinstance(error, HintError):
        return f"invalid kv_transfer_params: {error}"
    return str(error)


def bad_request_body(error: BodyError | HintError) -> bytes:
    """The body of the HTTP 400 reply, in the OpenAI API's error format (as vLLM's own)."""
    return json.dumps(
        {
            "error": {
                "message": error_message(error),
                "type": "BadRequestError",
                "param": error_param(error),
                "code": 400,
            }
        }
    ).encode()
