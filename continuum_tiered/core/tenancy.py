"""Program ids scoped per API key, so that one client cannot touch another's programs.

A pin belongs to a program id, and any client that names the id can end the program
(``last_turn``) or hand its pin to a request of its own. With scoping on, the server's
middleware (:class:`continuum_tiered.vllm.middleware.ProgramScopeMiddleware`) and the proxy
rewrite every ``kv_transfer_params.continuum.program_id`` (and the Continuum plugin's
``vllm_xargs.job_id``) to ``SCOPE:ID``, where ``SCOPE``
is the first 16 hex digits of the SHA-256 of the request's API key (``Authorization:
Bearer KEY``), or ``anonymous`` for a request without one. Ids of different keys never
collide, and no log line shows a key. ``SCOPE:ID`` longer than the hints allow becomes
``SCOPE:sha256:HEX`` (the SHA-256 of ``ID``), distinct as well.

The scope says which key a request carried, not that the key is valid: vLLM's own
``--api-key`` checks that (a client without a valid key gets 401, whatever its hints).
A proxy that scopes in front of a server that scopes too (it forwards the client's
``Authorization``) scopes each id twice: ``SCOPE:SCOPE:ID``, as distinct per key.
"""

from __future__ import annotations

import hashlib

from continuum_tiered.core.hints import HINTS_KEY, MAX_PROGRAM_ID_LEN

ANONYMOUS_SCOPE = "anonymous"
SCOPE_HEX_DIGITS = 16
SCOPE_MODES = ("none", "api-key")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def api_key_of(authorization: str | None) -> str | None:
    """The credential of an ``Authorization`` header: the key of ``Bearer KEY`` (any case),
    else the whole value; None when there is none."""
    if authorization is None:
        return None
    value = authorization.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


def api_key_scope(authorization: str | None) -> str:
    """The scope of a request with this ``Authorization`` header (None: without one)."""
    key = api_key_of(authorization)
    return ANONYMOUS_SCOPE if key is None else _sha256(key)[:SCOPE_HEX_DIGITS]


def scoped_program_id(scope: str, program_id: str) -> str:
    """``program_id`` in ``scope``: distinct for distinct (scope, id), never over the limit."""
    scoped = f"{scope}:{program_id}"
    if len(scoped) <= MAX_PROGRAM_ID_LEN:
        return scoped
    return f"{scope}:sha256:{_sha256(program_id)}"


def scope_hints(payload: dict[str, object], scope: str) -> bool:
    """Rewrite the body's hint program ids into ``scope``, in place: ours
    (``kv_transfer_params.continuum.program_id``) and the Continuum plugin's
    (``vllm_xargs.job_id``), which the connector reads too; whether there was one.

    The hints must have been checked already (:func:`continuum_tiered.core.hints.parse_hints`).
    """
    scoped = scope_xargs(payload, scope)
    params = payload.get("kv_transfer_params")
    if not isinstance(params, dict):
        return scoped
    hints = params.get(HINTS_KEY)
    if not isinstance(hints, dict) or not isinstance(hints.get("program_id"), str):
        return scoped
    hints["program_id"] = scoped_program_id(scope, hints["program_id"])
    return True


def scope_xargs(payload: dict[str, object], scope: str) -> bool:
    """Rewrite ``vllm_xargs.job_id`` into ``scope``, in place; whether there was one."""
    xargs = payload.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return False
    job_id = xargs.get("job_id")
    if not isinstance(job_id, str | int) or isinstance(job_id, bool):
        return False
    xargs["job_id"] = scoped_program_id(scope, str(job_id))
    return True
