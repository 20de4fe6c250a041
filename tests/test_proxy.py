"""``continuum-tiered proxy``: program identity, body rewriting, and the proxy in front of a
real ``continuum-tiered serve`` on the CPU build (one server for the module)."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
import openai
import pytest
import uvicorn
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from continuum_tiered.cli import main
from continuum_tiered.client.agent_program import (
    ROUTING_HEADER,
    AgentProgram,
    program_priority,
    routing_key,
)
from continuum_tiered.client.proxy.app import ProxyOptions, create_app
from continuum_tiered.core.program_tagging import ProgramRegistry, ProgramTagger, program_identity
from continuum_tiered.core.request_body import BodyError
from continuum_tiered.core.server_process import (
    BLOCK_SIZE,
    ServerProcess,
    free_port,
    plugin_server_command,
    prometheus_samples,
)
from continuum_tiered.core.tenancy import api_key_scope, scoped_program_id

NUM_BLOCKS = 64
HEADER = "X-Program-Id"


def tokens(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=n)


# ----------------------------------------------------------------- identity and state


def test_identity_is_the_header_then_user_then_the_session_header():
    both = Headers({"x-program-id": "h", "session_id": "s1", "x-session-id": "s2"})
    assert program_identity(both, {"user": "u"}, HEADER) == "h"
    assert program_identity(Headers({"x-program-id": ""}), {"user": "u"}, HEADER) == "u"
    assert program_identity(Headers({"session_id": "s1"}), {"user": 7}, HEADER) == "s1"
    assert program_identity(Headers({"x-session-id": "s2"}), {}, HEADER) == "s2"
    assert program_identity(Headers({"x-run": "r"}), {}, "X-Run") == "r"
    assert program_identity(Headers({}), {"user": ""}, HEADER) is None


def test_overlong_ids_become_distinct_valid_ids():
    first = program_identity(Headers({}), {"user": "a" * 300}, HEADER)
    second = program_identity(Headers({}), {"user": "a" * 299 + "b"}, HEADER)
    assert first and second and first != second and len(first) == 64


def test_registry_counts_turns_and_forgets_idle_and_finished_programs():
    programs = ProgramRegistry(idle_timeout_s=10, max_programs=2)
    assert programs.next_turn("a", 100.0) == (100.0, 0)
    assert programs.next_turn("a", 105.0) == (100.0, 1)
    assert programs.next_turn("b", 106.0) == (106.0, 0)
    assert programs.next_turn("a", 114.0) == (100.0, 2)
    assert programs.next_turn("c", 116.5) == (116.5, 0)
    assert len(programs) == 2  # b, idle for 10.5 s, was forgotten
    assert programs.next_turn("a", 130.0) == (130.0, 0)  # back after the idle timeout
    assert programs.next_turn("a", 131.0, last_turn=True) == (130.0, 1)
    assert programs.next_turn("a", 132.0) == (132.0, 0)  # after its last turn: a new program
    programs.next_turn("b", 133.0)
    programs.next_turn("c", 134.0)  # over the bound: a, the least recently seen, goes
    assert len(programs) == 2 and programs.next_turn("a", 135.0) == (135.0, 0)


# ---------------------------------------------------------------------- body rewriting


OPTIONS = ProxyOptions(program_header=HEADER)
UNSCOPED = ProxyOptions(program_header=HEADER, scope_programs=False)
NO_CONVERSATIONS = dataclasses.replace(UNSCOPED, conversations=False)


def rewrite(
    body: object,
    headers: dict[str, str],
    tagger: ProgramTagger,
    now: float,
    completion: bool = True,
):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    out = tagger.tag(raw, Headers(headers), now, completion).body
    return out if out is raw else json.loads(out)


def test_rewrite_adds_the_programs_priority_and_hints_turn_by_turn():
    programs = ProgramTagger(UNSCOPED)
    body = {"model": "m", "prompt": "hi", "kv_transfer_params": {"lmcache.tag": "x"}}
    first = rewrite(body, {HEADER: "A"}, programs, 1000.0)
    second = rewrite(body, {HEADER: "A", "X-Program-Last-Turn": "True"}, programs, 1002.5)
    assert first["priority"] == second["priority"] == program_priority(1000.0)
    assert first["kv_transfer_params"] == {
        "lmcache.tag": "x",
        "continuum": {"program_id": "A", "turn": 0, "last_turn": False},
    }
    assert second["kv_transfer_params"]["continuum"] == {
        "program_id": "A",
        "turn": 1,
        "last_turn": True,
    }
    assert first["prompt"] == "hi" and first["model"] == "m"


def test_without_conversations_a_request_without_identity_is_a_one_turn_program():
    programs = ProgramTagger(NO_CONVERSATIONS)
    out = rewrite({"prompt": "hi"}, {}, programs, 1234.5678)
    assert out == {"prompt": "hi", "priority": 1234567}
    assert len(programs.programs) == 0


def test_a_request_without_identity_is_the_turn_of_the_conversation_it_extends():
    """Turn 1 extends turn 0's prompt and reply; a conversation with a request in flight
    takes no other (an agent waits for its reply)."""
    programs = ProgramTagger(UNSCOPED)

    def send(prompt: str, now: float):
        tagged = programs.tag(json.dumps({"prompt": prompt}).encode(), Headers({}), now)
        return tagged, json.loads(tagged.body)

    first, sent_first = send("Q: ls\nA:", 1000.0)
    _, sent_while_in_flight = send("Q: ls\nA: a.py", 1001.0)
    programs.finish(first.open_turn, " a.py", 1002.0)
    _, sent_next = send("Q: ls\nA: a.py\nQ: cat a.py\nA:", 1003.0)
    hints = [b["kv_transfer_params"]["continuum"] for b in (sent_first, sent_while_in_flight)]
    hints.append(sent_next["kv_transfer_params"]["continuum"])
    assert hints[0]["program_id"] == hints[2]["program_id"] != hints[1]["program_id"]
    assert [h["turn"] for h in hints] == [0, 0, 1]
    assert sent_first["priority"] == sent_next["priority"] == program_priority(1000.0)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_bodies_that_are_not_json_objects_are_forwarded_untouched(body):
    programs = ProgramTagger(OPTIONS)
    assert programs.tag(body, Headers({HEADER: "A"}), 1.0).body is body
    assert len(programs.programs) == 0


@pytest.mark.parametrize("body", [b"[" * 10_000, b'{"a": NaN}', b'{"prompt": 1e400}'])
def test_hostile_bodies_raise_a_body_error_for_a_400(body):
    with pytest.raises(BodyError):
        ProgramTagger(OPTIONS).tag(body, Headers({}), 1.0)


def test_a_clients_priority_is_replaced_by_its_programs_unless_trusted():
    programs = ProgramTagger(NO_CONVERSATIONS)
    rewrite({"prompt": "hi"}, {HEADER: "A"}, programs, 1000.0)
    jump = {"prompt": "hi", "priority": -(10**9)}
    assert rewrite(jump, {HEADER: "A"}, programs, 1005.0)["priority"] == program_priority(1000.0)
    assert rewrite(jump, {}, programs, 1006.0)["priority"] == program_priority(1006.0)
    # Any path: a priority the client sent is replaced; none is added where there was none.
    assert rewrite(jump, {}, programs, 1007.0, completion=False)["priority"] == 1007000
    raw = json.dumps({"input": "hi"}).encode()
    kept = programs.tag(raw, Headers({}), 1.0, completion=False)
    assert kept.body is raw and kept.program_id is None
    trusted = ProgramTagger(dataclasses.replace(UNSCOPED, trust_client_priority=True))
    kept = rewrite(jump, {HEADER: "B"}, trusted, 1008.0)
    assert kept["priority"] == -(10**9) and kept["kv_transfer_params"]["continuum"]["turn"] == 0


def test_a_clients_own_hints_are_kept_scoped_and_given_the_programs_priority():
    programs = ProgramTagger(OPTIONS)
    hints = {"continuum": {"program_id": "B", "turn": 3, "tool": "ls"}}
    body = {"prompt": "hi", "priority": 5, "kv_transfer_params": hints}
    first = rewrite(body, {"Authorization": "Bearer k1"}, programs, 1000.0)
    again = rewrite(body, {"Authorization": "Bearer k1"}, programs, 1001.0)
    other = rewrite(body, {"Authorization": "Bearer k2"}, programs, 1002.0)
    sent = [b["kv_transfer_params"]["continuum"] for b in (first, again, other)]
    assert sent[0] == {
        "program_id": scoped_program_id(api_key_scope("Bearer k1"), "B"),
        "turn": 3,
        "last_turn": False,
        "tool": "ls",
    }
    assert sent[1]["program_id"] == sent[0]["program_id"] != sent[2]["program_id"]
    assert first["priority"] == again["priority"] == program_priority(1000.0)
    assert other["priority"] == program_priority(1002.0)  # another key: another program
    # Not this proxy's to judge: malformed hints go on as they are, for the server.
    bad = {"prompt": "hi", "kv_transfer_params": {"continuum": {"program_id": "A"}}}
    out = rewrite(bad, {HEADER: "A"}, programs, 1003.0)
    assert out["kv_transfer_params"] == bad["kv_transfer_params"]
    assert out["priority"] == program_priority(1003.0)


def test_program_ids_found_by_the_proxy_are_scoped_per_api_key():
    programs = ProgramTagger(OPTIONS)
    ids = [
        rewrite({"user": "run-7"}, headers, programs, 1000.0)["kv_transfer_params"]["continuum"][
            "program_id"
        ]
        for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}, {})
    ]
    assert len(set(ids)) == 3 and ids[2] == "anonymous:run-7"
    assert all(i.endswith(":run-7") and "k1" not in i for i in ids)


def test_continuum_plugin_job_ids_are_scoped_per_api_key():
    programs = ProgramTagger(OPTIONS)
    body = {"prompt": "hi", "vllm_xargs": {"job_id": 7, "is_last_step": True}}
    ids = [
        rewrite(body, headers, programs, 1000.0)["vllm_xargs"]["job_id"]
        for headers in ({"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"})
    ]
    assert ids[0] != ids[1] and all(i.endswith(":7") for i in ids)


def test_identities_that_no_hint_takes_are_hashed():
    surrogate = program_identity(Headers({}), {"user": "\ud800x"}, HEADER)
    assert surrogate is not None and len(surrogate) == 64


def test_cli_rejects_a_bad_upstream(capsys):
    assert main(["proxy", "--upstream", "localhost:8000"]) == 2
    assert "--upstream expects http(s)://HOST[:PORT]" in capsys.readouterr().err


# ------------------------------------------------------------------ the proxy, running


@contextmanager
def serve_in_thread(app: ASGIApp, lifespan: str = "auto") -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a thread of this process; yields its URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class RunningProxy:
    """``create_app`` served on a thread; records each completion body it sends upstream."""

    def __init__(self, url: str, sent: list[dict[str, object]]) -> None:
        self.url = url
        self.sent = sent
        self.client = httpx.Client(base_url=url, timeout=120)

    @staticmethod
    @contextmanager
    def running(upstream: str) -> Iterator[RunningProxy]:
        app = create_app(upstream, ProxyOptions(idle_timeout_s=600))
        sent: list[dict[str, object]] = []

        async def record(request: httpx.Request) -> None:
            if request.url.path.endswith("completions"):
                sent.append(json.loads(request.content))

        app.routes[0].endpoint.client.event_hooks["request"].append(record)
        with serve_in_thread(app) as url:
            yield RunningProxy(url, sent)

    def complete(self, prompt: list[int], headers: dict[str, str] | None = None, **body: object):
        payload = {"model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
        payload |= {"temperature": 0.0, "return_token_ids": True, **body}
        return self.client.post("/v1/completions", json=payload, headers=headers)

    def metric(self, name: str) -> float:
        """A counter of the upstream, read through the proxy's pass-through."""
        return prometheus_samples(self.url)[name]


def plugin_command(model: Path) -> list[str]:
    return plugin_server_command(
        model, NUM_BLOCKS, "--policy", "static-ttl", "--policy-option", "ttl_s=600"
    )


@pytest.fixture(scope="module")
def proxy(tiny_model_dir: Path, tmp_path_factory) -> Iterator[RunningProxy]:
    log = tmp_path_factory.mktemp("proxy-upstream") / "plugin.log"
    upstream = ServerProcess(plugin_command(tiny_model_dir), log)
    with upstream, RunningProxy.running(upstream.url) as running:
        yield running


def test_pass_through_of_other_paths(proxy):
    assert proxy.client.get("/health").status_code == 200
    models = proxy.client.get("/v1/models")
    assert models.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == ["tiny"]


def test_streamed_text_equals_the_non_streamed_text(proxy):
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="EMPTY", max_retries=0)
    request = {
        "model": "tiny",
        "prompt": tokens(5, 100),
        "max_tokens": 12,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**request).choices[0].text
    chunks = [
        c.choices[0].text for c in client.completions.create(stream=True, **request) if c.choices
    ]
    # Relayed as events, not as one body (vLLM may put several tokens in one event when
    # the reader lags; that the proxy does not buffer is tested with a fake upstream).
    assert len(chunks) > 1
    assert "".join(chunks) == whole


def test_a_programs_second_turn_gets_its_prefix_from_the_pin(proxy):
    handovers = proxy.metric("vllm:continuum_pin_handovers_total")
    headers = {HEADER: "agent-A"}
    first_prompt = tokens(1, 20 * BLOCK_SIZE)
    first = proxy.complete(first_prompt, headers)
    assert first.status_code == 200, first.text
    output = first.json()["choices"][0]["token_ids"]
    second = proxy.complete([*first_prompt, *output, *tokens(2, 50)], headers)
    assert second.status_code == 200, second.text

    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 20 * BLOCK_SIZE
    hints = [body["kv_transfer_params"]["continuum"] for body in proxy.sent[-2:]]
    assert [(h["program_id"], h["turn"], h["last_turn"]) for h in hints] == [
        ("anonymous:agent-A", 0, False),  # scoped: the client sent no API key
        ("anonymous:agent-A", 1, False),
    ]
    priorities = {body["priority"] for body in proxy.sent[-2:]}
    assert len(priorities) == 1 and priorities.pop() > 0  # the real server took it
    deadline = time.monotonic() + 5  # the API process gets the engine's stats each step
    while proxy.metric("vllm:continuum_pin_handovers_total") < handovers + 1:
        assert time.monotonic() < deadline, "no pin hand-over counted"
        time.sleep(0.1)


def test_an_agent_without_identity_is_one_program_by_its_conversation(proxy):
    """No id anywhere: the second turn extends the first's prompt and reply (token ids),
    so it is turn 1 of the same program, and the server's connector hands it the pin."""
    before = time.time()
    handovers = proxy.metric("vllm:continuum_pin_handovers_total")
    prompt = tokens(3, 64)
    first = proxy.complete(prompt)
    assert first.status_code == 200, first.text
    sent_first = proxy.sent[-1]
    reply = first.json()["choices"][0]["token_ids"]
    second = proxy.complete([*prompt, *reply, *tokens(5, 16)])
    assert second.status_code == 200, second.text
    hints = [s["kv_transfer_params"]["continuum"] for s in (sent_first, proxy.sent[-1])]
    assert hints[0]["program_id"] == hints[1]["program_id"]
    assert [h["turn"] for h in hints] == [0, 1]
    assert program_priority(before) <= sent_first["priority"] == proxy.sent[-1]["priority"]
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
    deadline = time.monotonic() + 10
    while proxy.metric("vllm:continuum_pin_handovers_total") < handovers + 1:
        assert time.monotonic() < deadline, "no pin hand-over counted"
        time.sleep(0.1)


def test_upstream_errors_pass_through_with_their_status_and_body(proxy):
    bad = {"continuum": {"program_id": "A"}}  # the client's own hints: forwarded unchanged
    response = proxy.complete(tokens(4, 16), kv_transfer_params=bad)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "kv_transfer_params.continuum.turn"
    assert proxy.sent[-1]["kv_transfer_params"] == bad


def test_an_unreachable_upstream_gives_502_naming_it():
    upstream = f"http://127.0.0.1:{free_port()}"
    with RunningProxy.running(upstream) as proxy:
        response = proxy.complete([1, 2, 3], {HEADER: "A"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == 502 and f"upstream {upstream} unreachable" in error["message"]


class GatedUpstream:
    """Sends one server-sent event, then the last one only once ``release`` is set; records
    whether the proxy hung up on it first."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.disconnected = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await receive()  # the request body
        while not self.release.is_set():
            with anyio.move_on_after(0.05):
                if (await receive())["type"] == "http.disconnect":
                    self.disconnected.set()
                    return
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


@contextmanager
def proxied_stream(upstream: GatedUpstream) -> Iterator[Iterator[bytes]]:
    with (
        serve_in_thread(upstream, lifespan="off") as url,
        RunningProxy.running(url) as proxy,
        proxy.client.stream("POST", "/v1/completions", json={"stream": True}) as response,
    ):
        assert response.status_code == 200
        yield response.iter_raw()


def test_events_are_relayed_as_the_upstream_sends_them():
    upstream = GatedUpstream()
    timer = threading.Timer(10, upstream.release.set)  # a buffering proxy fails, not hangs
    timer.start()
    with proxied_stream(upstream) as chunks:
        assert next(chunks) == b"data: 1\n\n"
        assert not upstream.release.is_set()
        upstream.release.set()
        assert b"".join(chunks) == b"data: [DONE]\n\n"
    timer.cancel()


def test_a_client_that_hangs_up_closes_the_upstream_request():
    upstream = GatedUpstream()
    with proxied_stream(upstream) as chunks:
        assert next(chunks) == b"data: 1\n\n"
    assert upstream.disconnected.wait(5)
    upstream.release.set()


# ------------------------------------------------------------ routing key for vllm-router


class HeaderRecorder:
    """An upstream that answers every request with an empty completion and records the
    values of the routing header each request carried (all of them, to catch duplicates)."""

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = ROUTING_HEADER.lower().encode()
        self.seen.append([v.decode() for k, v in scope["headers"] if k.lower() == name])
        while (await receive()).get("more_body"):
            pass
        body = json.dumps(
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
            }
        )
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


@contextmanager
def recorded_proxy() -> Iterator[tuple[RunningProxy, HeaderRecorder]]:
    upstream = HeaderRecorder()
    with serve_in_thread(upstream, lifespan="off") as url, RunningProxy.running(url) as proxy:
        yield proxy, upstream


def test_the_proxy_sends_the_scoped_program_id_as_the_routing_key_in_place_of_the_clients():
    with recorded_proxy() as (proxy, upstream):
        # A client naming another program's routing key does not get it: the program the
        # proxy resolved (scoped to the client's key) replaces it.
        proxy.complete([1], {HEADER: "A", ROUTING_HEADER: "victim", "x-session-id": "v2"})
        hints = {"continuum": {"program_id": "B", "turn": 0}}
        proxy.complete([1], {"Authorization": "Bearer k1"}, kv_transfer_params=hints)
        proxy.complete([1], user="run 7 \u00fc")  # no valid header value as it is
        proxy.complete([1])  # no id: its conversation's program, routed as one
        proxy.client.get("/v1/models", headers={ROUTING_HEADER: "s"})  # not rewritten
    conversation = upstream.seen.pop(3)
    assert upstream.seen == [
        ["anonymous:A"],
        [scoped_program_id(api_key_scope("Bearer k1"), "B")],
        [routing_key("anonymous:run 7 \u00fc")],
        ["s"],
    ]
    assert len(conversation) == 1 and conversation[0].startswith("anonymous:conv-")
    assert len(upstream.seen[2][0]) == 64 and upstream.seen[2][0].isascii()


def test_an_agent_program_sends_its_routing_key_on_every_turn_and_only_once():
    upstream = HeaderRecorder()
    with serve_in_thread(upstream, lifespan="off") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0)
        agent = AgentProgram("agent-7")
        for _ in range(2):
            agent.complete(client, model="m", prompt="hi", extra_headers={"x-session-id": "x"})
        AgentProgram("naïve run").complete(client, model="m", prompt="hi")
    assert upstream.seen == [["agent-7"], ["agent-7"], [routing_key("naïve run")]]
    assert agent.turn == 2
