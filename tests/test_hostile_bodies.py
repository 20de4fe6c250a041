"""Hostile request bodies and API-key scoping, through the real middlewares and the real proxy,
each served by uvicorn in front of a real ASGI app that echoes what reached it.

Every body is answered 400 with a message naming the problem, or passed on for the server
to answer in its own words: never a 500 (issue 18)."""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Iterator

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from test_proxy import serve_in_thread

from continuum_tiered.cli import main
from continuum_tiered.client.proxy.app import ProxyOptions, create_app
from continuum_tiered.core.hints import MAX_PROGRAM_ID_LEN
from continuum_tiered.core.request_body import MAX_JSON_DEPTH, BodyError, load_json_object
from continuum_tiered.core.tenancy import api_key_scope, scoped_program_id
from continuum_tiered.vllm.middleware import (
    HintValidationMiddleware,
    ProgramIdentityMiddleware,
    ProgramScopeMiddleware,
    ScopedProgramIdentityMiddleware,
)


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the exact body that reached it; the Content-Length header it was
    given comes back as ``x-seen-content-length``."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    seen = dict(scope["headers"]).get(b"content-length", b"")
    headers = [(b"content-type", b"application/octet-stream"), (b"x-seen-content-length", seen)]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def hinted(program_id: object = "p", turn: object = 0, **body: object) -> bytes:
    hints = {"continuum": {"program_id": program_id, "turn": turn}}
    return json.dumps({"model": "m", "prompt": "hi", "kv_transfer_params": hints, **body}).encode()


def nested(depth: int) -> bytes:
    return b'{"prompt": "hi", "logit_bias": ' + b"[" * depth + b"]" * depth + b"}"


PASS = "pass"
# (body, what the server-side middleware does); "400: TEXT" is a 400 whose message has TEXT.
HOSTILE = {
    "nested 200 levels": (nested(200), f"400: nests deeper than {MAX_JSON_DEPTH} levels"),
    "nested 100k levels": (nested(100_000), f"400: nests deeper than {MAX_JSON_DEPTH} levels"),
    "nested at the limit": (nested(MAX_JSON_DEPTH - 1), PASS),
    "unclosed brackets": (b"[" * 50_000, "400: nests deeper"),
    "unclosed shallow": (b'{"prompt": [[', PASS),
    "NaN": (b'{"prompt": "hi", "temperature": NaN}', "400: NaN, which is not a JSON number"),
    "-Infinity": (b'{"prompt": "hi", "top_p": -Infinity}', "400: -Infinity"),
    "1e999": (b'{"prompt": "hi", "temperature": 1e999}', "400: 1e999, beyond a float's range"),
    "5000-digit integer": (
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        "400: an integer of over 4300 digits",
    ),
    "4300-digit integer": (b'{"prompt": "hi", "max_tokens": ' + b"9" * 4300 + b"}", PASS),
    "non-UTF-8": (b'{"prompt": "\xff\xfe\xc3("}', PASS),
    "top-level array": (b'[{"prompt": "hi"}]', PASS),
    "top-level string": (b'"hi"', PASS),
    "empty": (b"", PASS),
    "10 MB prompt": (json.dumps({"prompt": "w1 " * 3_500_000}).encode(), PASS),
    "unicode program id": (hinted("程序-🚀-\u200b"), PASS),
    "256 emoji program id": (hinted("🚀" * MAX_PROGRAM_ID_LEN), PASS),
    "257-character program id": (hinted("x" * 257), "400: continuum.program_id"),
    "lone surrogate id": (hinted("\ud800"), "400: continuum.program_id"),
    "huge turn": (hinted(turn=10**30), "400: continuum.turn"),
    "huge turn, float": (hinted(turn=1e300), "400: continuum.turn"),
    "hints a list": (b'{"kv_transfer_params": {"continuum": [1]}}', "400: continuum"),
}


def rejected_by_the_reader(expected: str) -> bool:
    """Whether the shared body reader itself rejects the body (not the hints' parser)."""
    return expected.startswith("400") and "continuum" not in expected


def check(response: httpx.Response, sent: bytes, expected: str) -> None:
    assert response.status_code < 500, response.text
    if expected == PASS:
        assert response.status_code == 200
        assert response.content == sent  # untouched
    else:
        assert response.status_code == 400
        error = response.json()["error"]
        assert expected.removeprefix("400: ") in error["message"]
        assert error["code"] == 400 and error["type"] == "BadRequestError"


def client_of(middleware: type) -> Iterator[httpx.Client]:
    """A client of ``middleware`` wrapping the echo app, served by uvicorn in a thread."""
    with (
        serve_in_thread(middleware(echo_app), lifespan="off") as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def validating() -> Iterator[httpx.Client]:
    yield from client_of(HintValidationMiddleware)


@pytest.fixture(scope="module")
def scoping() -> Iterator[httpx.Client]:
    yield from client_of(ProgramScopeMiddleware)


@pytest.mark.parametrize("name", HOSTILE)
def test_the_middleware_answers_hostile_bodies_400_or_passes_them_on(validating, name):
    body, expected = HOSTILE[name]
    for path in ("/v1/completions", "/v1/chat/completions", "/inference/v1/generate"):
        check(validating.post(path, content=body), body, expected)


@pytest.fixture(scope="module", params=[ProgramIdentityMiddleware, ScopedProgramIdentityMiddleware])
def identifying(request) -> Iterator[httpx.Client]:
    yield from client_of(request.param)


@pytest.mark.parametrize("name", HOSTILE)
def test_the_identity_middleware_answers_hostile_bodies_400_or_passes_them_on(identifying, name):
    """As the validating one, except that a completion body that is a JSON object goes on
    with its program's priority (and hints, its conversation being a program)."""
    body, expected = HOSTILE[name]
    response = identifying.post("/v1/completions", content=body)
    if expected != PASS:
        check(response, body, expected)
    elif load_json_object(body) is None:
        check(response, body, PASS)  # not an object: untouched
    else:
        assert response.status_code == 200
        assert "priority" in json.loads(response.content)


def test_the_identity_middleware_gives_a_conversation_one_program(identifying):
    """The echo app's answer is no completion, so each turn extends the previous prompt
    (the identity's fallback when a reply cannot be read)."""
    seen = []
    prompt = "Q: ls\nA:"
    for follow_up in (" a.py\nQ: cat a.py\nA:", " x = 1\nQ: done\nA:"):
        response = identifying.post("/v1/completions", json={"model": "m", "prompt": prompt})
        seen.append(json.loads(response.content)["kv_transfer_params"]["continuum"])
        prompt += follow_up
    other = identifying.post("/v1/completions", json={"model": "m", "prompt": "Q: pwd\nA:"})
    seen.append(json.loads(other.content)["kv_transfer_params"]["continuum"])
    assert seen[0]["program_id"] == seen[1]["program_id"] != seen[2]["program_id"]
    assert [s["turn"] for s in seen] == [0, 1, 0]


def test_hint_errors_name_the_field(validating):
    error = validating.post("/v1/completions", content=hinted(turn=-1)).json()["error"]
    assert error["param"] == "kv_transfer_params.continuum.turn"
    error = validating.post("/v1/completions", content=nested(500)).json()["error"]
    assert error["param"] is None


@pytest.mark.parametrize("name", HOSTILE)
def test_the_shared_reader_raises_nothing_but_body_errors(name):
    body, expected = HOSTILE[name]
    if rejected_by_the_reader(expected):
        with pytest.raises(BodyError):
            load_json_object(body)
    else:
        load_json_object(body)  # None or an object; any other exception fails the test


# ------------------------------------------------------------------------------- tenancy


def echoed_program_id(client: httpx.Client, body: bytes, key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    response = client.post("/v1/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert int(response.headers["x-seen-content-length"]) == len(response.content)
    return json.loads(response.content)["kv_transfer_params"]["continuum"]["program_id"]


def test_program_ids_of_different_api_keys_never_meet(scoping):
    body = hinted("agent-1", 3, last_turn=True)
    a, b = echoed_program_id(scoping, body, "key-A"), echoed_program_id(scoping, body, "key-B")
    assert a != b and "agent-1" in a and "agent-1" in b
    assert a == echoed_program_id(scoping, body, "key-A")  # stable for one key
    assert "key-A" not in a and "key-B" not in b  # the key itself is never sent on
    assert echoed_program_id(scoping, body) == "anonymous:agent-1"
    assert echoed_program_id(scoping, hinted("x" * 256), "key-A") != echoed_program_id(
        scoping, hinted("x" * 255 + "y"), "key-A"
    )
    assert len(echoed_program_id(scoping, hinted("x" * 256), "key-A")) <= MAX_PROGRAM_ID_LEN


def test_the_scoping_middleware_checks_bodies_too(scoping):
    for name in ("nested 100k levels", "NaN", "lone surrogate id", "top-level array"):
        body, expected = HOSTILE[name]
        check(scoping.post("/v1/completions", content=body), body, expected)
    plain = json.dumps({"prompt": "no hints"}).encode()
    check(scoping.post("/v1/completions", content=plain), plain, PASS)


def test_scopes_come_from_the_bearer_key_only():
    assert api_key_scope(None) == api_key_scope("") == api_key_scope("Bearer ") == "anonymous"
    assert api_key_scope("Bearer k1") == api_key_scope("bearer  k1 ") != api_key_scope("k2")
    assert len(api_key_scope("Bearer k1")) == 16
    long = scoped_program_id(api_key_scope("Bearer k1"), "z" * MAX_PROGRAM_ID_LEN)
    assert len(long) <= MAX_PROGRAM_ID_LEN and ":sha256:" in long


# --------------------------------------------------------------------------------- proxy


@pytest.fixture(scope="module")
def proxied() -> Iterator[httpx.Client]:
    with (
        serve_in_thread(echo_app, lifespan="off") as upstream,
        serve_in_thread(create_app(upstream, ProxyOptions())) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


@pytest.mark.parametrize("name", HOSTILE)
def test_the_proxy_answers_hostile_bodies_400_or_forwards_them(proxied, name):
    body, expected = HOSTILE[name]
    response = proxied.post("/v1/completions", content=body)
    assert response.status_code < 500, response.text
    if rejected_by_the_reader(expected):
        check(response, body, expected)
        return
    assert response.status_code == 200  # forwarded: the upstream answers
    if load_json_object(body) is None:
        assert response.content == body  # not an object: untouched
    else:
        assert "priority" in json.loads(response.content)


@pytest.mark.parametrize(
    ("flags", "middleware"),
    [
        ([], ProgramIdentityMiddleware),
        (["--scope-programs", "api-key"], ScopedProgramIdentityMiddleware),
        (["--program-identity", "hints"], HintValidationMiddleware),
        (["--program-identity", "hints", "--scope-programs", "api-key"], ProgramScopeMiddleware),
    ],
)
def test_serve_prints_the_middleware_that_vllm_will_import(flags, middleware, capsys):
    assert main(["serve", "some/model", *flags, "--dry-run"]) == 0
    command = shlex.split(capsys.readouterr().out.splitlines()[-1])
    path = command[command.index("--middleware") + 1]
    module, _, name = path.rpartition(".")
    assert getattr(importlib.import_module(module), name) is middleware


def test_continuum_plugin_hints_are_checked_and_scoped_too(scoping, validating):
    """The connector reads the Continuum plugin's ``vllm_xargs`` as well: without scoping
    them, one key could end another's program with ``job_id`` + ``is_last_step``."""
    body = json.dumps({"prompt": "hi", "vllm_xargs": {"job_id": "agent-1", "is_last_step": 1}})
    seen = []
    for key in ("key-A", "key-B"):
        response = scoping.post(
            "/v1/completions", content=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code == 200, response.text
        seen.append(json.loads(response.content)["vllm_xargs"]["job_id"])
    assert seen[0] != seen[1] and all(s.endswith(":agent-1") for s in seen)
    bad = json.dumps({"prompt": "hi", "vllm_xargs": {"job_id": ["x"]}}).encode()
    response = validating.post("/v1/completions", content=bad)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "vllm_xargs.job_id"
