"""End to end on the real OpenAI server of vLLM's CPU build, with a tiny random Llama.

Three servers, one after another, each shared by the tests that need it:
plain vLLM, ``continuum-tiered serve`` (connector + program FCFS + hint validation), and a
plain ``vllm serve`` with the connector but without the validating middleware.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
    vanilla_server_command,
)

NUM_BLOCKS = 64  # 63 usable blocks of 32 tokens
PIN_TTL_S = 600  # far longer than any test: a pin that blocked admission would hang it


def tokens(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=n)


def vanilla_command(model: Path) -> list[str]:
    return vanilla_server_command(model, NUM_BLOCKS, "--enable-prompt-tokens-details")


def plugin_command(model: Path) -> list[str]:
    return plugin_server_command(
        model,
        NUM_BLOCKS,
        "--policy",
        "static-ttl",
        "--policy-option",
        f"ttl_s={PIN_TTL_S}",
        "--scope-programs",  # program ids per API key; without a key, all share one scope
        "api-key",
    )


def connector_only_command(model: Path) -> list[str]:
    kv = {"kv_connector": "ContinuumConnector", "kv_role": "kv_both"}
    return vanilla_server_command(model, NUM_BLOCKS, "--kv-transfer-config", json.dumps(kv))


@dataclass
class Server:
    process: ServerProcess
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.process.url, timeout=120)

    def complete(self, prompt: list[int], max_tokens: int = 4, **body: object) -> httpx.Response:
        payload = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}
        payload |= {"ignore_eos": True, "return_token_ids": True, "temperature": 0.0, **body}
        return self.client.post("/v1/completions", json=payload)

    def metric(self, name: str) -> float:
        return prometheus_samples(self.process.url)[name]


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory) -> Iterator[dict[str, Server]]:
    """Starts each server on first use and stops them all at the end of the module."""
    logs = tmp_path_factory.mktemp("server-logs")
    commands = {
        "vanilla": vanilla_command,
        "plugin": plugin_command,
        "connector-only": connector_only_command,
    }
    started: dict[str, Server] = {}

    class Lazy(dict):
        def __missing__(self, key: str) -> Server:
            for other in started.values():  # one engine at a time on two cores
                other.process.stop()
            process = ServerProcess(commands[key](tiny_model_dir), logs / f"{key}.log").start()
            started[key] = self[key] = Server(process)
            return self[key]

    yield Lazy()
    for server in started.values():
        server.process.stop()


def hints(program: str, turn: int, last: bool = False) -> dict[str, object]:
    return {"continuum": {"program_id": program, "turn": turn, "last_turn": last}}


def tool_pause_scenario(server: Server, with_hints: bool) -> dict[str, object]:
    """Program A's turn 1, then B and C fill the pool during A's tool call, then A's turn 2."""

    def turn(prompt: list[int], program: str, index: int, last: bool) -> list[int]:
        body = {"kv_transfer_params": hints(program, index, last)} if with_hints else {}
        response = server.complete(prompt, **body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return choice["token_ids"], response.json()["usage"]["prompt_tokens_details"]

    a0 = tokens(1, 640)
    out_a0, _ = turn(a0, "A", 0, False)
    out_b, _ = turn(tokens(2, 1200), "B", 0, True)
    out_c, _ = turn(tokens(3, 1200), "C", 0, True)
    a1 = [*a0, *out_a0, *tokens(4, 50)]
    out_a1, details = turn(a1, "A", 1, True)
    return {"outputs": [out_a0, out_b, out_c, out_a1], "a1_cached": details["cached_tokens"]}


@pytest.fixture(scope="module")
def vanilla_run(servers) -> dict[str, object]:
    return tool_pause_scenario(servers["vanilla"], with_hints=False)


@pytest.fixture(scope="module")
def plugin_run(servers, vanilla_run) -> dict[str, object]:
    return tool_pause_scenario(servers["plugin"], with_hints=True)


def test_pinned_prefix_survives_the_tool_call_only_with_the_plugin(vanilla_run, plugin_run):
    assert plugin_run["a1_cached"] == 640
    assert vanilla_run["a1_cached"] < 640


def test_greedy_outputs_are_identical_with_and_without_the_plugin(vanilla_run, plugin_run):
    assert plugin_run["outputs"] == vanilla_run["outputs"]


def test_waiting_program_is_admitted_without_waiting_for_the_ttl(servers, plugin_run):
    server = servers["plugin"]
    before = server.metric("vllm:continuum_pin_releases_pressure_total")
    first = server.complete(tokens(10, 640), kv_transfer_params=hints("P", 0), priority=1)
    assert first.status_code == 200
    # 1,760 tokens need 55 blocks; with P's 20-block pin held only 43 are free.
    big = server.complete(tokens(11, 1760), kv_transfer_params=hints("Q", 0, True), priority=2)
    assert big.status_code == 200, big.text
    assert server.metric("vllm:continuum_pin_releases_pressure_total") == before + 1


def test_malformed_hints_get_400_naming_the_field_and_the_server_keeps_serving(servers):
    server = servers["plugin"]
    bad = server.complete(tokens(20, 64), kv_transfer_params={"continuum": {"program_id": "A"}})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["param"] == "kv_transfer_params.continuum.turn"
    assert "continuum.turn" in error["message"]
    assert server.complete(tokens(20, 64)).status_code == 200


def test_one_api_key_cannot_end_another_keys_program(servers):
    """Key B names key A's program in a last turn; A's pin survives B's turn and a pool's
    worth of churn, and A's next turn gets its whole prefix from it."""
    server = servers["plugin"]

    def turn(prompt: list[int], key: str, index: int, last: bool) -> httpx.Response:
        response = server.client.post(
            "/v1/completions",
            json={
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": 4,
                "ignore_eos": True,
                "return_token_ids": True,
                "kv_transfer_params": hints("shared-id", index, last),
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        assert response.status_code == 200, response.text
        return response

    a0 = tokens(40, 640)
    out_a0 = turn(a0, "key-A", 0, False).json()["choices"][0]["token_ids"]
    pins = server.metric("vllm:continuum_active_pins")
    turn(tokens(41, 64), "key-B", 1, True)  # "ends" shared-id: only key B's, which had none
    for seed in (42, 43):  # churn the rest of the pool: unpinned blocks are evicted
        churn = hints(f"churn-{seed}", 0, last=True)  # one-turn programs: nothing pinned
        assert server.complete(tokens(seed, 1200), kv_transfer_params=churn).status_code == 200
    assert server.metric("vllm:continuum_active_pins") == pins
    a1 = turn([*a0, *out_a0, *tokens(44, 50)], "key-A", 1, True)
    assert a1.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 640


def test_malformed_hints_reaching_the_engine_are_ignored_with_a_warning(servers):
    server = servers["connector-only"]
    bad = {"continuum": {"program_id": "A", "turn": -1}}
    response = server.complete(tokens(30, 64), kv_transfer_params=bad)
    assert response.status_code == 200
    assert server.complete(tokens(31, 64)).status_code == 200
    log = server.process.log_path.read_text()
    assert "ignoring its hints" in log and "continuum.turn" in log
    assert server.metric("vllm:continuum_hints_rejected_total") == 1
