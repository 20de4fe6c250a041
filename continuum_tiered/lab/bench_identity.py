"""Requests per second through ``continuum-tiered proxy`` holding 10,000 live conversations,
against the same proxy with conversation identity off, side by side in one run.

Method. The upstream is a minimal OpenAI-shaped server (:data:`fixed_reply_app`: every
completion answered at once with one fixed reply, no model): what is measured is the
proxy's own cost, which a model server's milliseconds per request would hide. Proxy and
upstream run as processes of their own (the proxy through its CLI), the load generator in
this one. Each round, for each side in turn (alternating which goes first): a fresh
proxy, ``--conversations`` programs opened (turn 0: a system prompt of about 2 KB and a
task of its own), then ``--requests`` timed requests, ``--concurrency`` at a time, each
the next turn of a random open conversation (its messages so far, the reply it got, a
tool output). A side's figure is its median requests per second over the rounds; the
ratio is the median of the per-round ratios. The same requests are also timed in process
through :class:`~continuum_tiered.core.program_tagging.ProgramTagger` alone (no HTTP):
microseconds per request to find and update the conversation.

    .venv/bin/python experiments/bench_identity.py --out docs/results/identity-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from tqdm import tqdm

from continuum_tiered.core.net import free_port
from continuum_tiered.core.program_tagging import ProgramTagger, TaggingOptions

REPLY = {"role": "assistant", "content": "THOUGHT: look around.\n```bash\nls -la\n```"}
SYSTEM_PROMPT = "You are a helpful assistant that can interact with a computer. " * 32


async def _fixed_reply(request: Request) -> JSONResponse:
    await request.body()
    choice = {"index": 0, "message": REPLY, "finish_reason": "stop"}
    return JSONResponse({"id": "c", "object": "chat.completion", "choices": [choice]})


fixed_reply_app = Starlette(routes=[Route("/v1/chat/completions", _fixed_reply, methods=["POST"])])


@dataclass
class Conversation:
    messages: list[dict[str, str]]

    def next_turn(self, turn: int) -> dict[str, object]:
        """The request of the next turn; the reply it will get is appended."""
        body = {"model": "tiny", "messages": list(self.messages)}
        self.messages += [REPLY, {"role": "user", "content": f"<output>{turn}: a.py b.py</output>"}]
        return body


def conversations(count: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    return [
        Conversation([
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Fix issue {i}: {rng.getrandbits(64):x}"},
        ])
        for i in range(count)
    ]  # fmt: skip


def workload(args: argparse.Namespace, seed: int) -> tuple[list[dict], list[dict]]:
    """Opening requests (turn 0 of each conversation), then the timed ones."""
    open_conversations = conversations(args.conversations, seed)
    opening = [c.next_turn(0) for c in open_conversations]
    rng = random.Random(seed + 1)
    turns = [0] * len(open_conversations)
    timed = []
    for _ in range(args.requests):
        i = rng.randrange(len(open_conversations))
        turns[i] += 1
        timed.append(open_conversations[i].next_turn(turns[i]))
    return opening, timed


@contextmanager
def process(command: list[str], url: str, timeout_s: float = 180) -> Iterator[str]:
    """``command`` running until the block ends, once ``url`` answers (any status)."""
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command[2:5]} did not answer at {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        child.terminate()
        child.wait(10)


def proxy_command(upstream: str, port: int, identity: bool) -> list[str]:
    command = [sys.executable, "-m", "continuum_tiered.cli", "proxy", "--upstream", upstream]
    command += ["--port", str(port), "--max-conversations", "20000"]
    return command if identity else [*command, "--no-conversation-identity"]


async def send_all(url: str, bodies: list[dict], concurrency: int, label: str) -> float:
    """Seconds to send every body, ``concurrency`` at a time."""
    queue = iter(bodies)
    bar = tqdm(total=len(bodies), desc=label, leave=False, file=sys.stderr)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            for body in queue:
                response = await client.post("/v1/chat/completions", json=body)
                response.raise_for_status()
                bar.update()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    bar.close()
    return elapsed


def proxy_rps(args: argparse.Namespace, upstream: str, identity: bool, seed: int) -> float:
    opening, timed = workload(args, seed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process(proxy_command(upstream, port, identity), f"{url}/v1/models"):
        side = "identity" if identity else "no identity"
        asyncio.run(send_all(url, opening, args.concurrency, f"{side}: opening"))
        return len(timed) / asyncio.run(send_all(url, timed, args.concurrency, side))


def tagger_us_per_request(args: argparse.Namespace, seed: int) -> float:
    """The in-process cost: tag + finish of each timed request, after the opening ones."""
    opening, timed = workload(args, seed)
    tagger = ProgramTagger(TaggingOptions(max_conversations=2 * args.conversations))
    headers: dict[str, str] = {}

    def one(body: dict) -> None:
        tagged = tagger.tag(json.dumps(body).encode(), headers, time.time())
        if tagged.open_turn is not None:
            tagger.finish(tagged.open_turn, REPLY, time.time())

    for body in opening:
        one(body)
    start = time.perf_counter()
    for body in timed:
        one(body)
    return (time.perf_counter() - start) / len(timed) * 1e6


@dataclass
class Result:
    conversations: int
    requests: int
    concurrency: int
    rounds: int
    rps_identity: float
    rps_no_identity: float
    ratio: float  # identity / no identity, median of the rounds' ratios
    tagger_us_per_request: float


def run(args: argparse.Namespace) -> Result:
    upstream_port = free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    serve_upstream = [
        sys.executable, "-m", "uvicorn", "continuum_tiered.lab.bench_identity:fixed_reply_app",
        "--port", str(upstream_port), "--log-level", "warning",
    ]  # fmt: skip
    rates: dict[bool, list[float]] = {True: [], False: []}
    with process(serve_upstream, f"{upstream}/docs"):
        for round_ in range(args.rounds):
            for identity in (True, False) if round_ % 2 == 0 else (False, True):
                rates[identity].append(proxy_rps(args, upstream, identity, args.seed + round_))
    ratios = [a / b for a, b in zip(rates[True], rates[False], strict=True)]
    return Result(
        conversations=args.conversations,
        requests=args.requests,
        concurrency=args.concurrency,
        rounds=args.rounds,
        rps_identity=statistics.median(rates[True]),
        rps_no_identity=statistics.median(rates[False]),
        ratio=statistics.median(ratios),
        tagger_us_per_request=tagger_us_per_request(args, args.seed),
    )


def report(result: Result) -> str:
    return "\n".join([
        "# Proxy throughput with conversation identity",
        "",
        f"{result.conversations} live conversations, {result.requests} timed requests, "
        f"{result.concurrency} at a time, median of {result.rounds} rounds "
        "(`python experiments/bench_identity.py`).",
        "",
        "| proxy | requests/s |",
        "|---|---|",
        f"| conversation identity on | {result.rps_identity:.0f} |",
        f"| identity off | {result.rps_no_identity:.0f} |",
        f"| ratio on / off | **{result.ratio:.3f}** |",
        "",
        f"In process, finding and updating a conversation costs "
        f"{result.tagger_us_per_request:.0f} us per request (tag + finish, no HTTP).",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/identity-bench"))
    args = parser.parse_args(argv)
    for name in ("conversations", "requests", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    result = run(args)
    text = report(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(text)
    (args.out / "result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0
