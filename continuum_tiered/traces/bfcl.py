"""BFCL v4 multi-turn tasks (from the ``bfcl-eval`` package's data files) as trace programs.

``bfcl-eval`` is a data source only (installed without its dependencies): this module
reads ``bfcl_eval/data/BFCL_v4_multi_turn_{base,long_context,miss_func,miss_param}.json``
(tasks: user turns, involved API classes), ``possible_answer/`` (the ground-truth calls
of each user turn) and ``multi_turn_func_doc/`` (the function docs of each class).

No model ran these tasks, so the calls are modelled on the ground truth:

- Calls: each user turn makes one LLM call per ground-truth function call plus one final
  call that answers the user without a tool. BFCL queries the model again after every
  tool result until a reply has no call; a model may batch calls in one reply, but most
  ground-truth calls depend on the previous one (``cd`` then ``mv``), so one call per
  reply is the likely and conservative (most-turns) reading. A turn with no ground-truth
  call (a missing function or parameter) is the answer only.
- Prompt: the function docs of the task's classes, serialized as JSON, then the
  conversation so far: user messages, each call as its ground-truth string, each tool
  result, each final answer. As in BFCL's prompting mode, the docs of a ``miss_func``
  task's held-out functions arrive as the user message of the turn that adds them (so the
  prompt keeps growing as a prefix). No chat-template overhead is counted.
- Tool result: estimated as the size of the function's documented ``response`` schema
  serialized as JSON (same order of size as a small JSON result; BFCL's long-context
  results, which its executable backend inflates, are not modelled).
- Tokens: 4 characters per token (:func:`~continuum_tiered.traces.build.estimate_tokens`)
  for every text above; a call's output is its ground-truth string; a final answer is
  ``FINAL_ANSWER_TOKENS``.
- Tool: the called function's name; the final answer has none.
- Tool durations: lognormal with Continuum's reported BFCL mean and std (1923 +- 2133 ms
  per tool call), seeded per program. After a final answer the next user message follows
  at once (0 s): BFCL's user turns are scripted.
"""

from __future__ import annotations

import ast
import json
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from continuum_tiered.traces.build import BuildOptions, Call, build_program, estimate_tokens
from continuum_tiered.traces.model import TraceError, TraceProgram

CATEGORIES = ("base", "long_context", "miss_func", "miss_param")
FINAL_ANSWER_TOKENS = 32
INSTALL_HINT = "pip install --no-deps bfcl-eval (or scripts/bootstrap.sh)"


@dataclass(frozen=True)
class LognormalDurations:
    """Tool durations from a lognormal with the given mean and standard deviation.

    With ``s2 = ln(1 + (std / mean)^2)``, ``mu = ln(mean) - s2 / 2`` and ``sigma = sqrt(s2)``
    the lognormal has exactly that mean and std. No tool (a final answer) takes 0 s.
    """

    mean_s: float = 1.923
    std_s: float = 2.133

    def sample(self, tool: str | None, rng: random.Random) -> float:
        if tool is None:
            return 0.0
        s2 = math.log1p((self.std_s / self.mean_s) ** 2)
        return rng.lognormvariate(math.log(self.mean_s) - s2 / 2, math.sqrt(s2))


def load_bfcl(
    categories: Iterable[str] = CATEGORIES,
    durations: LognormalDurations | None = None,
    options: BuildOptions | None = None,
    limit: int | None = None,
) -> list[TraceProgram]:
    """The first ``limit`` tasks of the given categories, in category then file order."""
    durations = durations or LognormalDurations()
    options = options or BuildOptions()
    programs: list[TraceProgram] = []
    for category in categories:
        for task, answer in _tasks(category):
            if limit is not None and len(programs) >= limit:
                return programs
            calls = task_calls(task, answer["ground_truth"], _docs_of)
            programs.append(build_program(task["id"], calls, durations, options))
    return programs


def task_calls(
    task: dict, ground_truth: list[list[str]], docs_of: Callable[[str], list[dict]]
) -> list[Call]:
    """The modelled LLM calls of one task; ``docs_of`` gives a class's function docs."""
    where = f"BFCL task {task.get('id')!r}"
    try:
        docs = [doc for cls in task["involved_classes"] for doc in docs_of(cls)]
        return _task_calls(task, ground_truth, docs, where)
    except TraceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise TraceError(f"{where}: {err!r}") from err


def _task_calls(
    task: dict, ground_truth: list[list[str]], docs: list[dict], where: str
) -> list[Call]:
    questions = task["question"]
    if len(questions) != len(ground_truth):
        raise TraceError(f"{where}: {len(questions)} user turns, {len(ground_truth)} answers")
    held_out = {int(turn): set(names) for turn, names in task.get("missed_function", {}).items()}
    late = set().union(*held_out.values())
    added = {turn: [d for d in docs if d["name"] in names] for turn, names in held_out.items()}
    responses = {d["name"]: _tokens(json.dumps(d.get("response", {}))) for d in docs}

    context = _tokens(json.dumps([d for d in docs if d["name"] not in late]))
    calls: list[Call] = []
    for turn, (messages, expected) in enumerate(zip(questions, ground_truth, strict=True)):
        context += sum(_tokens(m["content"]) for m in messages)
        context += _tokens(json.dumps(added[turn])) if turn in added else 0
        for text in expected:
            name = _function_name(text, f"{where} turn {turn}")
            calls.append(Call(context, _tokens(text), name))
            context += _tokens(text) + responses.get(name, 0)
        calls.append(Call(context, FINAL_ANSWER_TOKENS, None))
        context += FINAL_ANSWER_TOKENS
    return calls


def _tokens(text: str) -> int:
    return estimate_tokens(len(text))


def _function_name(call: str, where: str) -> str:
    """``mv`` of ``"mv(source='a', destination='b')"``."""
    try:
        node = ast.parse(call, mode="eval").body
    except SyntaxError as err:
        raise TraceError(f"{where}: ground-truth call {call!r} does not parse") from err
    func = node.func if isinstance(node, ast.Call) else None
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    raise TraceError(f"{where}: ground-truth entry {call!r} is not a function call")


def _data() -> Traversable:
    try:
        return resources.files("bfcl_eval") / "data"
    except ModuleNotFoundError as err:
        raise ValueError(f"BFCL traces need the bfcl-eval package: {INSTALL_HINT}") from err


def _json_lines(file: Traversable) -> list[dict]:
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _tasks(category: str) -> list[tuple[dict, dict]]:
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; known: {', '.join(CATEGORIES)}")
    name = f"BFCL_v4_multi_turn_{category}.json"
    tasks = _json_lines(_data() / name)
    answers = {a["id"]: a for a in _json_lines(_data() / "possible_answer" / name)}
    missing = [t["id"] for t in tasks if t["id"] not in answers]
    if missing:
        raise TraceError(f"{name}: no ground truth for {missing[:3]}")
    return [(t, answers[t["id"]]) for t in tasks]


@cache
def _docs_of(cls: str) -> list[dict]:
    from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

    return _json_lines(_data() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls])
