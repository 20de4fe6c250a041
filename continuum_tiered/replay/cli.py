"""``continuum-tiered replay``: an agent trace against a running OpenAI-compatible server.

The real-time counterpart of ``continuum-tiered simulate``: programs arrive as a Poisson
process of ``--jps`` programs per (wall-clock) second and run turn by turn through
:mod:`continuum_tiered.replay.runner`. With ``--policy-hints off`` requests are plain, as
vanilla vLLM needs (under its default FCFS policy it rejects a priority other than 0).

``DIR/summary.json`` has the shape of the virtual-time replay's, with one run over the
completed programs, plus ``failed_programs``. Its ``avg_queue_s`` is the mean streamed time
to first token per turn: queueing plus prefill as the client sees it (the virtual-time
replay counts queueing alone; a client cannot tell the two apart). ``prefix_hit_ratio``
comes from ``usage.prompt_tokens_details.cached_tokens``. ``DIR/programs.jsonl`` has each
program's turns and error.

The module imports no vLLM: it runs wherever the trace and the server's URL are.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from continuum_tiered.core.metrics import markdown_table
from continuum_tiered.replay.runner import (
    ProgramRecord,
    RetryPolicy,
    RunnerOptions,
    run_programs,
    summarize_records,
)
from continuum_tiered.traces.arrivals import NAMES, load_named_trace, with_poisson_arrivals

PROBE_S = 3.0  # how long a server that does not answer is waited for before giving up


class ReplayError(ValueError):
    pass


def add_replay_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replay", help="replay an agent trace in real time against an OpenAI-compatible server"
    )
    p.add_argument("--endpoint", required=True, help="server URL, e.g. http://localhost:8000")
    p.add_argument("--trace", required=True, help=f"{', '.join(NAMES)} or a trace JSONL path")
    p.add_argument("--jps", type=float, required=True, help="program arrivals per second")
    p.add_argument("--programs", type=int, required=True, help="first N programs of the trace")
    p.add_argument(
        "--policy-hints",
        choices=("on", "off"),
        required=True,
        help="send program priority and connector hints (off: plain requests, for vanilla vLLM)",
    )
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies tool durations")
    p.add_argument("--token-scale", type=float, default=1.0, help="multiplies token counts")
    p.add_argument("--model", help="served model name (default: the server's first model)")
    p.add_argument("--seed", type=int, default=0, help="arrivals, token ids, tool durations")
    p.add_argument("--label", help="policy name in the summary (default: hints-on|hints-off)")
    defaults = RetryPolicy()
    p.add_argument(
        "--attempts", type=int, default=defaults.attempts, help="tries per request, at most"
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=defaults.backoff_s,
        help="seconds before the first retry, doubled before each next one",
    )
    p.add_argument(
        "--retry-window",
        type=float,
        default=defaults.max_total_s,
        help="seconds from a turn's first try after which it is not retried",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout_s,
        help="seconds one try may take, from send to the last token",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(run=run_replay)


def served_models(endpoint: str, probe_s: float = PROBE_S) -> list[str]:
    """The ids ``GET /v1/models`` lists, retried for ``probe_s`` seconds."""
    deadline = time.monotonic() + probe_s
    while True:
        try:
            response = httpx.get(f"{endpoint}/v1/models", timeout=2.0)
            response.raise_for_status()
            return [model["id"] for model in response.json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
            if time.monotonic() + 0.5 > deadline:
                raise ReplayError(
                    f"no OpenAI-compatible server answers at {endpoint} "
                    f"(GET /v1/models: {type(err).__name__}: {err}); is it running?"
                ) from None
            time.sleep(0.5)


def resolve_model(endpoint: str, requested: str | None) -> str:
    models = served_models(endpoint)
    if requested is None:
        if not models:
            raise ReplayError(f"{endpoint} lists no model; name one with --model")
        return models[0]
    if requested not in models:
        raise ReplayError(f"{endpoint} serves {', '.join(models) or 'no model'}, not {requested!r}")
    return requested


def run_replay(args: argparse.Namespace, _passthrough: list[str]) -> int:
    if not args.endpoint.startswith(("http://", "https://")):
        raise ReplayError(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
    if args.time_scale < 0 or not args.token_scale > 0:
        raise ReplayError("--time-scale must be >= 0 and --token-scale > 0")
    retry = RetryPolicy(args.attempts, args.backoff, args.retry_window, args.request_timeout)
    trace = load_named_trace(args.trace, args.programs, args.seed, args.token_scale)
    programs = with_poisson_arrivals(trace, args.jps, args.seed)
    endpoint = args.endpoint.rstrip("/").removesuffix("/v1")
    options = RunnerOptions(
        model=resolve_model(endpoint, args.model),
        send_hints=args.policy_hints == "on",
        time_scale=args.time_scale,
        seed=args.seed,
        retry=retry,
    )
    label = args.label or f"hints-{args.policy_hints}"

    with tqdm(total=len(programs), unit="program", desc=f"replay {label}") as bar:
        failed = 0

        def done(record: ProgramRecord) -> None:
            nonlocal failed
            failed += record.error is not None
            bar.set_postfix(failed=failed)
            bar.update()

        records = asyncio.run(run_programs(endpoint, programs, options, done))

    summary = summarize_records(label, args.jps, records)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "trace": str(args.trace),
        "profile": None,  # a real server: no tier profile
        "model": options.model,
        "seed": args.seed,
        "endpoint": endpoint,
        "time_scale": args.time_scale,
        "token_scale": args.token_scale,
        "runs": [summary.to_json()],
        "failed_programs": failed,
    }
    (args.out / "summary.json").write_text(json.dumps(document, indent=2))
    with (args.out / "programs.jsonl").open("w") as f:
        for record in records:
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")
    table = markdown_table([summary])
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    if failed:
        print(
            f"{failed} of {len(records)} programs failed; their errors are in programs.jsonl",
            file=sys.stderr,
        )
    print(f"\nwrote {args.out}/summary.json, summary.md, programs.jsonl")
    return 0
