"""Hostile and malformed request bodies against a live ``continuum-tiered serve``: every one
answered 400 naming the problem, or served; never a 5xx; no KV block left behind.

Method. One server on vLLM's CPU build: the tiny random Llama of
:mod:`continuum_tiered.core.tiny_model`, the default retention policy (whose TTLs on a model
this small are 0: ``--policy static-ttl`` makes pins to check for leaks), a KV pool of
``--kv-blocks`` blocks, the hint-checking middleware (``--scope-programs api-key``: the
scoping one), and a one-line chat template so that ``/v1/chat/completions`` serves too.
:func:`hostile_bodies` generates ``--bodies`` distinct bodies from ``--seed``: wrong types,
sizes and values of every hint field and of ``kv_transfer_params``; unicode, empty,
over-long and lone-surrogate program ids; extra and missing fields; NaN, Infinity, numbers
beyond a float and integers of thousands of digits; arrays and objects nested up to
100,000 deep; top-level arrays, scalars, truncated JSON, non-UTF-8 bytes; wrong types of
the OpenAI fields beside good hints; three bodies of 10 MB; and well-formed hinted turns
of a few programs; half on ``/v1/completions``, half on ``/v1/chat/completions``. Each is
sent once, in order, with the answer checked:

- 400 with an error message (vLLM's ``error.message``, or FastAPI's ``detail`` for a body
  it cannot parse), or 200 (served); another 4xx with a message (404 for an unknown
  model) is counted apart; a 5xx, a dropped connection or an answer without a message is
  wrong;
- where the shared reader (:func:`continuum_tiered.core.request_body.request_error`) finds a
  problem, the answer must be 400 with its message, word for word.

Then a plain request must be served, every program sent a good hint gets a last turn, and
the engine is ticked until ``/metrics`` shows no pin; ``vllm:kv_cache_usage_perc`` then
must be 0. The script prints bodies sent, answered 400, served, other 4xx, 5xx, pins
created, hints that reached the engine malformed (the middleware should leave none), and
the KV blocks and pins at the end, and exits 1 when any check failed.

    .venv/bin/python experiments/fuzz_hints.py [--bodies 1200] [--seed 0]
        [--policy static-ttl --policy-option ttl_s=30] [--scope-programs api-key]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from continuum_tiered.core.hints import HINTS_KEY, MAX_PROGRAM_ID_LEN, MAX_TURN, parse_hints
from continuum_tiered.core.request_body import (
    MAX_JSON_DEPTH,
    BodyError,
    error_message,
    load_json_object,
    request_error,
)
from continuum_tiered.core.server_process import ServerProcess, plugin_server_command
from continuum_tiered.core.tiny_model import TinyLlamaShape, write_tiny_llama
from continuum_tiered.lab.reliability import (
    format_problems,
    kv_state,
    log_problems,
    wait_for_pins_gone,
)

PATHS = ("/v1/completions", "/v1/chat/completions")
MODEL = "tiny"
VOCAB = TinyLlamaShape().vocab_size
PROGRAMS = tuple(f"fuzz-program-{i}" for i in range(12))
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
RAW = "__raw_json__"  # a string value replaced by raw JSON text after json.dumps
BIG_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class FuzzBody:
    kind: str
    path: str
    body: bytes


# --------------------------------------------------------------------- body generator


def _words(rng: random.Random, n: int | None = None) -> str:
    return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(n or rng.randint(3, 24)))


def _request(rng: random.Random, path: str, words: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "max_tokens": rng.choice((1, 2)), "temperature": 0}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": _words(rng, words)}]
    else:
        body["prompt"] = _words(rng, words)
    return body


def _good_hints(rng: random.Random) -> dict[str, object]:
    hints: dict[str, object] = {
        "program_id": rng.choice(PROGRAMS),
        "turn": rng.randrange(8),
        "last_turn": False,
    }
    if rng.random() < 0.5:
        hints["tool"] = rng.choice(("grep", "ls", "python3", "pytest", "sed"))
    return hints


BAD_IDS: tuple[object, ...] = (
    "",
    "x" * (MAX_PROGRAM_ID_LEN + 1),
    "y" * 10_000,
    "\ud800",
    "ok\udfffthen",
    7,
    -1.5,
    True,
    None,
    [],
    ["a"],
    {"id": "a"},
)
ODD_BUT_GOOD_IDS = (
    "程序-一",
    "🚀" * MAX_PROGRAM_ID_LEN,
    "עברית-rtl",
    "zero\u200bwidth",
    "nul\u0000byte",
    "new\nline",
    " ",
    "'; DROP TABLE pins; --",
    "../../etc/passwd",
    "%s%s%n",
    "a" * MAX_PROGRAM_ID_LEN,
)
BAD_TURNS: tuple[object, ...] = (-1, MAX_TURN + 1, 10**30, 1.5, "1", True, None, [], {}, 1e300)
BAD_LAST_TURNS: tuple[object, ...] = ("true", 1, 0, None, [], "yes")
BAD_TOOLS: tuple[object, ...] = ("", "rm -rf /", "a" * 65, 3, "grep\n", "grép", [], {})
RAW_NUMBERS = ("NaN", "Infinity", "-Infinity", "1e999", "-1e400", "9" * 5000, "1" * 4300)
BAD_OPENAI_FIELDS: tuple[tuple[str, object], ...] = (
    ("max_tokens", "x"),
    ("max_tokens", -1),
    ("max_tokens", 10**30),
    ("max_tokens", 1.5),
    ("temperature", -5),
    ("temperature", "hot"),
    ("top_p", 7),
    ("n", 0),
    ("stop", {"a": 1}),
    ("logit_bias", [1, 2]),
    ("priority", "first"),
    ("priority", 10**30),
    ("model", "no-such-model"),
    ("stream", "yes"),
    ("seed", -(10**30)),
)


def _hint_field_body(rng: random.Random, path: str) -> dict[str, object]:
    body = _request(rng, path)
    hints = _good_hints(rng)
    field = rng.choice(("program_id", "turn", "last_turn", "tool", "extra", "missing"))
    if field == "program_id":
        hints["program_id"] = rng.choice((*BAD_IDS, *ODD_BUT_GOOD_IDS))
    elif field == "turn":
        hints["turn"] = rng.choice(BAD_TURNS)
    elif field == "last_turn":
        hints["last_turn"] = rng.choice(BAD_LAST_TURNS)
    elif field == "tool":
        hints["tool"] = rng.choice(BAD_TOOLS)
    elif field == "extra":
        hints[rng.choice(("priority", "ttl", "Program_Id", "", "\u0000"))] = rng.randrange(9)
    else:
        del hints[rng.choice(("program_id", "turn"))]
    body["kv_transfer_params"] = {HINTS_KEY: hints}
    return body


def _params_shape_body(rng: random.Random, path: str) -> tuple[dict[str, object], str | None]:
    """A body, and the raw JSON text for its ``RAW`` placeholder, if it has one."""
    body = _request(rng, path)
    raw = None
    choice = rng.randrange(8)
    if choice == 0:
        body["kv_transfer_params"] = rng.choice(([], "continuum", 3, True, [_good_hints(rng)]))
    elif choice == 1:
        body["kv_transfer_params"] = {HINTS_KEY: rng.choice(("p", None, 3, [], [1, 2]))}
    elif choice == 2:  # other connectors' keys beside good hints: fine
        body["kv_transfer_params"] = {"lmcache.tag": "x", HINTS_KEY: _good_hints(rng)}
    elif choice == 3:  # deep nesting inside the hints' neighbour
        depth = rng.choice((MAX_JSON_DEPTH - 8, MAX_JSON_DEPTH + 1, 600, 5000))
        body["kv_transfer_params"] = {"other": RAW, HINTS_KEY: _good_hints(rng)}
        raw = "[" * depth + "]" * depth
    elif choice == 4:
        body["kv_transfer_params"] = {}
    elif choice == 5:
        body["kv_transfer_params"] = None
    elif choice == 6:
        body["kv_transfer_params"] = {HINTS_KEY: {**_good_hints(rng), "turn": [[[]]]}}
    else:
        wide = {f"k{i}": i for i in range(rng.randrange(100, 3000))}
        body["kv_transfer_params"] = {**wide, HINTS_KEY: _good_hints(rng)}
    return body, raw


def _openai_field_body(rng: random.Random, path: str) -> dict[str, object]:
    body = _request(rng, path)
    body["kv_transfer_params"] = {HINTS_KEY: _good_hints(rng)}
    field, value = rng.choice(BAD_OPENAI_FIELDS)
    body[field] = value
    if rng.random() < 0.3:
        body[f"unknown_{rng.randrange(1000)}"] = _words(rng, 2)
    return body


def _raw_number_body(rng: random.Random, path: str) -> tuple[dict[str, object], str]:
    body = _request(rng, path)
    hints = _good_hints(rng)
    where = rng.choice(("turn", "temperature", "max_tokens", "extra", "nested"))
    if where == "turn":
        hints["turn"] = RAW
    elif where == "nested":
        body["logit_bias"] = {"5": RAW}
    elif where == "extra":
        body["vendor_field"] = [RAW]
    else:
        body[where] = RAW
    body["kv_transfer_params"] = {HINTS_KEY: hints}
    return body, rng.choice(RAW_NUMBERS)


def _encode(payload: object, rng: random.Random) -> bytes:
    ascii_only = rng.random() < 0.5
    try:
        return json.dumps(payload, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:  # lone surrogates: only as \\u escapes
        return json.dumps(payload).encode()


def _not_object_body(rng: random.Random, path: str) -> bytes:
    good = _encode(_request(rng, path), rng)
    choice = rng.randrange(12)
    if choice == 0:
        return b"[" + good + b"]"
    if choice == 1:
        return rng.choice((b"null", b"true", b"0", b'"text"', b"1e999", b"-"))
    if choice == 2:
        return good[: rng.randrange(1, len(good))]  # truncated
    if choice == 3:
        return b""
    if choice == 4:
        return b" \n\t " * rng.randrange(1, 50)
    if choice == 5:  # invalid UTF-8 inside a string
        cut = good.index(b'"', 2)
        return good[:cut] + bytes(rng.randrange(128, 256) for _ in range(3)) + good[cut:]
    if choice == 6:
        return b"\xef\xbb\xbf" + good  # a UTF-8 byte-order mark
    if choice == 7:
        return good.decode().encode("utf-16")
    if choice == 8:
        return b"[" * rng.choice((MAX_JSON_DEPTH + 1, 1000, 100_000))  # unclosed, deep
    if choice == 9:
        depth = rng.choice((MAX_JSON_DEPTH + 1, 2000, 100_000))
        return b'{"model": "tiny", "prompt": "w1", "x": ' + b"{" * depth + b"}" * depth + b"}"
    if choice == 10:  # the same key twice: the last one counts, in every JSON parser here
        return good[:-1] + b', "kv_transfer_params": {"continuum": {"program_id": 5}}}'
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))


def _big_bodies(rng: random.Random) -> Iterator[FuzzBody]:
    """Three bodies of 10 MB: a prompt of words, a prompt of token ids, a junk field."""
    chunk = _words(rng, 1000)  # repeated: drawing millions of words takes seconds
    words = " ".join([chunk] * (BIG_BYTES // len(chunk) + 1))
    yield FuzzBody("big", PATHS[0], json.dumps({"model": MODEL, "prompt": words}).encode())
    ids = [rng.randrange(3, VOCAB) for _ in range(1000)] * (BIG_BYTES // 4000)
    yield FuzzBody("big", PATHS[0], json.dumps({"model": MODEL, "prompt": ids}).encode())
    body = {**_request(rng, PATHS[1]), "junk": "x" * BIG_BYTES}
    body["kv_transfer_params"] = {HINTS_KEY: _good_hints(rng)}
    yield FuzzBody("big", PATHS[1], json.dumps(body).encode())


KINDS = (
    ("good-hints", 10),
    ("hint-field", 35),
    ("params-shape", 12),
    ("openai-field", 15),
    ("raw-number", 13),
    ("not-object", 15),
)


def hostile_bodies(seed: int = 0, count: int = 1200) -> Iterator[FuzzBody]:
    """``count`` distinct bodies (three of 10 MB among them), the same for the same seed."""
    rng = random.Random(seed)
    seen: set[tuple[str, bytes]] = set()
    made = 0
    for big in _big_bodies(rng):
        seen.add((big.path, big.body))
        made += 1
        yield big
    kinds, weights = zip(*KINDS, strict=True)
    while made < count:
        kind = rng.choices(kinds, weights)[0]
        path = PATHS[made % 2]
        if kind == "good-hints":  # full 32-token blocks, which a pin holds
            payload = _request(rng, path, rng.randint(64, 400))
            payload["kv_transfer_params"] = {HINTS_KEY: _good_hints(rng)}
            body = _encode(payload, rng)
        elif kind == "hint-field":
            body = _encode(_hint_field_body(rng, path), rng)
        elif kind == "params-shape":
            payload, raw = _params_shape_body(rng, path)
            body = _encode(payload, rng)
            if raw is not None:
                body = body.replace(f'"{RAW}"'.encode(), raw.encode())
        elif kind == "openai-field":
            body = _encode(_openai_field_body(rng, path), rng)
        elif kind == "raw-number":
            payload, raw = _raw_number_body(rng, path)
            body = _encode(payload, rng).replace(f'"{RAW}"'.encode(), raw.encode())
        else:
            body = _not_object_body(rng, path)
        if (path, body) in seen:
            continue
        seen.add((path, body))
        made += 1
        yield FuzzBody(kind, path, body)


# --------------------------------------------------------------------------- the run


@dataclass
class Tally:
    sent: int = 0
    answered_400: int = 0
    served: int = 0
    other: int = 0
    server_errors: int = 0
    wrong: int = 0

    def __post_init__(self) -> None:
        self.examples: list[str] = []
        self.statuses: collections.Counter[int] = collections.Counter()


def good_program_id(body: bytes) -> str | None:
    """The program of a served body's well-formed hints that is not a last turn."""
    try:
        payload = load_json_object(body)
        hints = parse_hints(payload.get("kv_transfer_params")) if payload else None
    except (BodyError, ValueError):
        return None
    return hints.program_id if hints is not None and not hints.last_turn else None


def error_text(response: httpx.Response) -> str | None:
    """The message of an error answer: vLLM's OpenAI-style ``error.message``, or the
    ``detail`` of FastAPI's own (a body it could not parse)."""
    try:
        data = response.json()
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        return error["message"]
    detail = data.get("detail")
    if isinstance(detail, str) and detail:
        return detail
    return json.dumps(detail) if isinstance(detail, list) and detail else None


def check_answer(item: FuzzBody, response: httpx.Response, tally: Tally) -> str | None:
    """What is wrong with the answer to ``item``; None when it is right."""
    status = response.status_code
    tally.statuses[status] += 1
    expected = request_error(item.body)
    if status >= 500:
        tally.server_errors += 1
        return f"{status}: {response.text[:200]}"
    if status == 200:
        tally.served += 1
        return None if expected is None else f"served, but expected 400: {expected}"
    if status == 400:
        tally.answered_400 += 1
    else:
        tally.other += 1  # another 4xx of the server's own (an unknown model: 404)
    message = error_text(response)
    if message is None:
        return f"{status} without an error message: {response.text[:200]}"
    if expected is not None and (status != 400 or message != error_message(expected)):
        return f"{status} {message[:120]!r}, expected 400 {error_message(expected)[:120]!r}"
    return None


def send_all(url: str, bodies: list[FuzzBody], tally: Tally) -> set[str]:
    """Send every body; the programs that a served body gave a good hint."""
    programs: set[str] = set()
    headers = {"content-type": "application/json", "authorization": "Bearer fuzz-key"}
    with httpx.Client(base_url=url, timeout=300) as client:
        for item in tqdm(bodies, desc="bodies", unit="body"):
            try:
                response = client.post(item.path, content=item.body, headers=headers)
            except httpx.HTTPError as err:
                tally.sent += 1
                tally.server_errors += 1
                tally.examples.append(f"[{item.kind}] {type(err).__name__}: {err}")
                continue
            tally.sent += 1
            problem = check_answer(item, response, tally)
            if problem is not None:
                tally.wrong += 1
                if len(tally.examples) < 10:
                    tally.examples.append(
                        f"[{item.kind} {item.path}] {item.body[:80]!r}: {problem}"
                    )
            elif response.status_code == 200 and (program := good_program_id(item.body)):
                programs.add(program)
    return programs


def end_programs(url: str, programs: set[str]) -> int:
    """A last turn for each program; the number not served."""
    failed = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for program in sorted(programs):
            hints = {"program_id": program, "turn": 99, "last_turn": True}
            body = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 1}
            body["kv_transfer_params"] = {HINTS_KEY: hints}
            headers = {"authorization": "Bearer fuzz-key"}
            failed += client.post("/v1/completions", json=body, headers=headers).status_code != 200
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bodies", type=int, default=1200, help="distinct bodies to send")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-blocks", type=int, default=128)
    p.add_argument("--scope-programs", choices=("none", "api-key"), default="none")
    p.add_argument(
        "--policy",
        help="retention policy (default: serve's default; on this tiny model its TTLs are 0, "
        "so no pin is made: static-ttl with --policy-option ttl_s=30 makes some)",
    )
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("out/fuzz_hints"))
    args = p.parse_args(argv)

    bodies = list(hostile_bodies(args.seed, args.bodies))
    kinds = collections.Counter(b.kind for b in bodies)
    print(
        f"{len(bodies)} bodies from seed {args.seed}: "
        + ", ".join(f"{k} {n}" for k, n in kinds.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-hints-") as tmp:
        model = write_tiny_llama(Path(tmp) / "model")
        template = Path(tmp) / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        policy = ["--policy", args.policy] if args.policy else []
        policy += [f"--policy-option={option}" for option in args.policy_option]
        command = plugin_server_command(
            model,
            args.kv_blocks,
            *policy,
            "--scope-programs",
            args.scope_programs,
            "--chat-template",
            str(template),
        )
        log = args.out / "server.log"
        tally = Tally()
        start = time.monotonic()
        with ServerProcess(command, log) as server:
            print(f"server ready in {time.monotonic() - start:.0f} s (log: {log})", flush=True)
            start = time.monotonic()
            programs = send_all(server.url, bodies, tally)
            elapsed = time.monotonic() - start
            plain = {"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": 2}
            still_serves = httpx.post(f"{server.url}/v1/completions", json=plain, timeout=60)
            time.sleep(0.5)  # that step's stats reach the gauges
            before = kv_state(server.url)
            unended = end_programs(server.url, programs)
            state, waited = wait_for_pins_gone(server.url, MODEL, timeout_s=300)
            state = kv_state(server.url)
            # Before shutdown, whose own log lines are no finding.
            problems = log_problems(log.read_text(errors="replace").splitlines())

    blocks = state.blocks_in_use(args.kv_blocks)
    rows = [
        ("bodies sent", tally.sent),
        ("answered 400", tally.answered_400),
        ("served (200)", tally.served),
        ("answered another 4xx", tally.other),
        ("5xx or no answer", tally.server_errors),
        ("wrong answers", tally.wrong),
        ("pins after the bodies", f"{before.active_pins:g}"),
        ("programs ended", len(programs)),
        ("pins created", f"{state.counters.get('pins_created', 0):g}"),
        ("hints rejected by the engine", f"{state.counters.get('hints_rejected', 0):g}"),
        ("KV blocks in use at the end", f"{blocks:g}"),
        (
            "active pins / pinned blocks at the end",
            f"{state.active_pins:g} / {state.pinned_blocks:g}",
        ),
    ]
    print(f"\nsent in {elapsed:.0f} s; pins gone after {waited:.1f} s of ticks")
    print(f"\n{'':<40} {'':>8}")
    for name, value in rows:
        print(f"{name:<40} {value!s:>8}")
    print("\nstatuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.statuses.items())))
    print(f"a plain request afterwards: HTTP {still_serves.status_code}")
    errors = collections.Counter({text: n for text, n in problems.items() if "WARNING" not in text})
    print(f"server log while serving: {sum(errors.values())} error or traceback lines")
    for line in format_problems(errors):
        print(f"  {line}")
    for example in tally.examples:
        print(f"  {example}")
    ok = (
        tally.server_errors == 0
        and tally.wrong == 0
        and still_serves.status_code == 200
        and unended == 0
        and blocks == 0
        and state.pins_gone
    )
    print("\nOK" if ok else "\nFAILED")
    return 0 if ok else 1
