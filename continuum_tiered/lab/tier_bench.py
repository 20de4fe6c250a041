"""Time to bring back a program's prefix from a pin, LMCache's CPU tier, its disk tier, or
by recomputing it, on vLLM's CPU build, in one run.

Method. One ``continuum-tiered serve --tiers`` server (tiny random Llama of
``continuum_tiered.core.tiny_model``, 512 bytes of KV a token; pins with a static TTL;
LMCache CPU tier of ``CPU_TIER_TOKENS`` tokens and a disk tier under a temporary directory).
For each prefix length N, a program sends turn 0 (N tokens) and then turn 1 (its prefix,
turn 0's output and 32 new tokens, one output token); the time of turn 1's request is the
figure. Between the two turns:

- pin: nothing; turn 1 finds the pinned blocks.
- cpu: the pin expires and filler programs (2,048 tokens each, ``last_turn``) take every
  GPU block; LMCache's CPU tier still holds the prefix.
- disk: as cpu, then more fillers push the prefix out of the CPU tier; only disk has it.
- recompute: turn 1 is sent without a turn 0 (a fresh prefix).

Each row's source is checked against the server's ``vllm:continuum_prefix_tokens_from_*``
counters; a row whose prefix came from elsewhere is marked. Ratios are to recompute.

    .venv/bin/python experiments/bench_tiers.py [--lengths 1024,4096,16384]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import httpx

from continuum_tiered.core.server_process import (
    ServerProcess,
    plugin_server_command,
    prometheus_samples,
)
from continuum_tiered.core.tiny_model import TinyLlamaShape, write_tiny_llama

SOURCES = ("pin", "cpu", "disk", "recompute")
COUNTER_OF = {"pin": "gpu", "cpu": "cpu", "disk": "disk", "recompute": "recompute"}
TTL_S = 1.0
FILLER_TOKENS = 2048
SUFFIX_TOKENS = 32
BLOCK_SIZE = 32


class Bench:
    def __init__(self, process: ServerProcess, pool_tokens: int, cpu_tier_tokens: int):
        self.process = process
        self.http = httpx.Client(base_url=process.url, timeout=600)
        self.pool_tokens = pool_tokens
        self.cpu_tier_tokens = cpu_tier_tokens
        self._seed = 0

    def tokens(self, n: int) -> list[int]:
        self._seed += 1
        return random.Random(self._seed).choices(range(3, 500), k=n)

    def turn(self, prompt: list[int], program: str, turn: int, last: bool, out: int) -> list[int]:
        hints = {"continuum": {"program_id": program, "turn": turn, "last_turn": last}}
        body = {"model": "tiny", "prompt": prompt, "max_tokens": out, "ignore_eos": True}
        body |= {"temperature": 0.0, "return_token_ids": True, "kv_transfer_params": hints}
        response = self.http.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["token_ids"]

    def fill(self, tokens: int) -> None:
        for i in range(-(-tokens // FILLER_TOKENS)):
            self.turn(self.tokens(FILLER_TOKENS), f"filler-{self._seed}-{i}", 0, True, 1)

    def sources(self) -> dict[str, float]:
        samples = prometheus_samples(self.process.url, "vllm:continuum_prefix_tokens_from_")
        return {
            s: samples.get(f"vllm:continuum_prefix_tokens_from_{s}_total", 0.0)
            for s in set(COUNTER_OF.values())
        }

    def bring_back(self, n: int, source: str) -> tuple[float, str]:
        """Seconds for turn 1, and the source the counters saw for most of its prefix."""
        program = f"{source}-{n}"
        prefix = self.tokens(n)
        if source == "recompute":
            prompt = [*prefix, *self.tokens(SUFFIX_TOKENS)]
        else:
            out = self.turn(prefix, program, 0, False, 4)
            prompt = [*prefix, *out, *self.tokens(SUFFIX_TOKENS)]
        if source in ("cpu", "disk"):
            time.sleep(TTL_S + 0.2)
            self.fill(self.pool_tokens)
        if source == "disk":
            self.fill(self.cpu_tier_tokens)
        before = self.sources()
        start = time.perf_counter()
        self.turn(prompt, program, 1, True, 1)
        seconds = time.perf_counter() - start
        after = self.sources()
        delta = {s: after[s] - before[s] for s in after}
        seen = max(delta, key=lambda s: delta[s])
        return seconds, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    longest = max(lengths) + 4 + SUFFIX_TOKENS
    num_blocks = -(-longest // BLOCK_SIZE) + 2
    pool_tokens = (num_blocks - 1) * BLOCK_SIZE
    cpu_tier_tokens = 2 * pool_tokens + max(lengths)
    kv_bytes_per_token = 512
    with tempfile.TemporaryDirectory() as tmp:
        shape = replace(TinyLlamaShape(), max_position_embeddings=2 * longest)
        model = write_tiny_llama(Path(tmp) / "model", shape)
        command = plugin_server_command(
            model,
            num_blocks,
            "--policy",
            "static-ttl",
            "--policy-option",
            f"ttl_s={TTL_S}",
            "--tiers",
            f"cpu={cpu_tier_tokens * kv_bytes_per_token}B,"
            f"disk={tmp}:{8 * cpu_tier_tokens * kv_bytes_per_token}B",
        )
        print(f"server log: {tmp}/server.log (removed at exit)", flush=True)
        with ServerProcess(command, Path(tmp) / "server.log") as process:
            bench = Bench(process, pool_tokens, cpu_tier_tokens)
            bench.bring_back(512, "recompute")  # warm-up
            rows = {n: {s: bench.bring_back(n, s) for s in SOURCES} for n in lengths}
    print_table(rows)


def print_table(rows: dict[int, dict[str, tuple[float, str]]]) -> None:
    print("\nTime to bring back a prefix (turn 1 request, 1 output token), ms")
    print("(x: ratio to recompute)")
    print(f"| prefix tokens | {' | '.join(SOURCES)} |")
    print(f"|---:|{'---:|' * len(SOURCES)}")
    for n, row in rows.items():
        recompute = row["recompute"][0]
        cells = []
        for source in SOURCES:
            seconds, seen = row[source]
            mark = "" if seen == COUNTER_OF[source] else f" (served from {seen}!)"
            cells.append(f"{seconds * 1e3:.1f} ({seconds / recompute:.2f}x){mark}")
        print(f"| {n} | {' | '.join(cells)} |")
