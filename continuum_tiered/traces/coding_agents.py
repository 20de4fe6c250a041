"""Heavy-tailed coding-agent workloads: SWE-bench programs with Claude Code / Codex pauses.

The source fact (../shared/DESIGN.md §8): real coding-agent tool times (TraceLab, uw-syfi,
357k rounds of Claude Code and Codex) have a median tool call of about 125 ms (Claude Code)
and 626 ms (Codex); most tool time lies in rare calls of 1 s to 10 min; human input waits
sit between turns. Nothing else below is measured: every distribution, share and
probability is an assumption chosen to match that fact.

The programs keep the real token structure of the SWE-bench programs (prompts, outputs,
tools: :func:`~continuum_tiered.traces.swebench.load_swebench`); only the pause after each
call is drawn from :class:`HeavyTailedToolTimes`, seeded per ``(seed, program_id)`` by the
shared builder. A pause is the tool time plus, sometimes, a human wait:

- Tool time: a mixture of a *body* of sub-second calls, a lognormal ``(body_mu,
  body_sigma)`` truncated to below ``TAIL_MIN_S`` = 1 s, and a *tail* log-uniform on
  [1 s, 600 s] (``TAIL_MIN_S``, ``TAIL_MAX_S``). Truncating the body makes the tail exactly
  the "calls of 1 s to 10 min" of the fact. Log-uniform is the assumption: every decade of
  1 s..10 min is equally likely (tail median 24.5 s, mean 93.6 s).
- Tool-aware tail (assumption): a call is in the tail with probability ``tail_p_long`` =
  0.25 when its tool runs code (test, build, script: ``LONG_TOOLS`` and any ``*.sh``) and
  ``tail_p_short`` = 0.01 otherwise (cat, grep, sed, ls, git, ...: reads, searches, edits).
  The same for both agents: their commands are the same SWE-bench programs' commands.
- Body (assumption): Claude Code's own read/search/edit tools run in-process, fast and
  widely spread (``body_sigma`` = 1.0); Codex runs every call, reads included, as a
  sandboxed shell command whose start-up puts a floor under it (``body_sigma`` = 0.5).
- Calibration: in SWE-bench's tool mix (the 500-program file) ``SWEBENCH_LONG_SHARE`` =
  23.55% of tool calls are long-class, so 6.65% of calls are in the tail; ``body_mu`` is
  solved by :func:`body_mu_for` so that the *mixture's* median is exactly the cited
  125 ms / 626 ms. Then at least ``TAIL_TIME_SHARE_MIN`` = 90% of tool time lies in the
  1 s..10 min calls (97.5% for Claude Code, 91.6% for Codex): "most tool time".
  ``tests/test_coding_agent_traces.py`` checks the constants, the medians and the share.
- Human waits (assumption): a reply without a tool call hands control back to the user in
  both agents, so a human wait always follows it (in the SWE-bench source such mid-program
  replies are rare, 3.5% of calls). After a tool call a human wait follows with probability
  ``human_wait_p`` = 0.05 (a permission prompt, or the user reading and steering). A wait is
  log-uniform on [5 s, 600 s] (median 55 s): reading output and typing a reply, cut at 10
  minutes where a session would count as idle. A tool-less reply's tool time is 0 s, as
  in the other samplers; a program's last call still pauses 0 s (nothing follows it).

Human waits are added to the pause, so a trace's "tool duration" median is a little above
the tool-time median (133 ms and 641 ms over the 500 programs). About 8.3% of pauses carry
a human wait (5% of tool calls, plus the 3.5% tool-less replies); a program pauses about
11 minutes in all, most of it in human waits. The embedded 50-program slice has a
slightly longer tool mix (24.9% long-class): its tool-time medians are 0.6% higher. No
pause exceeds ``MAX_PAUSE_S`` = ``TAIL_MAX_S + HUMAN_MAX_S`` = 20 minutes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

from continuum_tiered.traces.build import BuildOptions
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.traces.swebench import load_swebench

TAIL_MIN_S = 1.0
TAIL_MAX_S = 600.0
HUMAN_MIN_S = 5.0
HUMAN_MAX_S = 600.0
MAX_PAUSE_S = TAIL_MAX_S + HUMAN_MAX_S
TAIL_TIME_SHARE_MIN = 0.90
SWEBENCH_LONG_SHARE = 0.2355

LONG_TOOLS = frozenset(
    {
        "python", "python2", "python3", "pytest", "runtests.py", "tox", "nox", "pip",
        "pip3", "make", "cmake", "npm", "npx", "yarn", "node", "cargo", "go", "mvn",
        "gradle", "sphinx-build", "django-admin", "bash", "sh", "timeout", "pylint",
        "mypy", "apt-get",
    }
)  # fmt: skip

_NORMAL = NormalDist()


def is_long_tool(tool: str) -> bool:
    """Whether ``tool`` runs code (tests, builds, scripts), where long calls concentrate."""
    return tool in LONG_TOOLS or tool.endswith(".sh")


@dataclass(frozen=True)
class HeavyTailedToolTimes:
    """Pauses of a coding agent: heavy-tailed tool times plus human waits (see the module
    docstring for every distribution and why)."""

    median_s: float
    body_mu: float
    body_sigma: float
    tail_p_long: float = 0.25
    tail_p_short: float = 0.01
    human_wait_p: float = 0.05

    def sample(self, tool: str | None, rng: random.Random) -> float:
        return self.tool_time(tool, rng) + self.human_wait(tool, rng)

    def tail_p(self, tool: str) -> float:
        return self.tail_p_long if is_long_tool(tool) else self.tail_p_short

    def tool_time(self, tool: str | None, rng: random.Random) -> float:
        """Seconds the tool runs: 0 without a tool, else the body or the tail."""
        if tool is None:
            return 0.0
        if rng.random() < self.tail_p(tool):
            return _log_uniform(TAIL_MIN_S, TAIL_MAX_S, rng)
        # Inverse CDF of the lognormal below TAIL_MIN_S; 1 - random() lies in (0, 1].
        below = _NORMAL.cdf((math.log(TAIL_MIN_S) - self.body_mu) / self.body_sigma)
        z = _NORMAL.inv_cdf(min((1.0 - rng.random()) * below, 1.0 - 1e-16))
        return math.exp(self.body_mu + self.body_sigma * z)

    def human_wait(self, tool: str | None, rng: random.Random) -> float:
        """Seconds a human takes before the next call: always after a tool-less reply,
        with probability ``human_wait_p`` after a tool call, else 0."""
        if tool is not None and rng.random() >= self.human_wait_p:
            return 0.0
        return _log_uniform(HUMAN_MIN_S, HUMAN_MAX_S, rng)


def _log_uniform(low: float, high: float, rng: random.Random) -> float:
    return low * (high / low) ** rng.random()


def body_mu_for(median_s: float, body_sigma: float, tail_p: float) -> float:
    """The body's ``mu`` for which the mixture's median is ``median_s`` (< 1 s) when a share
    ``tail_p`` of calls is in the tail. Below 1 s only the body has mass, so the body,
    truncated below 1 s, needs ``P(X < median | X < 1 s) = 0.5 / (1 - tail_p)``; that
    probability falls as ``mu`` rises, so bisection finds it."""
    target = 0.5 / (1.0 - tail_p)
    if not (median_s < TAIL_MIN_S and target < 1.0):
        raise ValueError(f"no body gives median {median_s} s with tail share {tail_p}")

    def below_median(mu: float) -> float:
        at_cut = _NORMAL.cdf((math.log(TAIL_MIN_S) - mu) / body_sigma)
        return _NORMAL.cdf((math.log(median_s) - mu) / body_sigma) / at_cut

    low, high = math.log(median_s) - 10 * body_sigma, 5 * body_sigma
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if below_median(mid) > target else (low, mid)
    return (low + high) / 2


def swebench_tail_p(times: HeavyTailedToolTimes, long_share: float = SWEBENCH_LONG_SHARE) -> float:
    """The share of tool calls in the tail over a tool mix with ``long_share`` long calls."""
    return long_share * times.tail_p_long + (1 - long_share) * times.tail_p_short


# body_mu = body_mu_for(median_s, body_sigma, swebench_tail_p(...)), rounded: see the tests.
CLAUDE_CODE = HeavyTailedToolTimes(median_s=0.125, body_mu=-2.1475, body_sigma=1.0)
CODEX = HeavyTailedToolTimes(median_s=0.626, body_mu=-0.3491, body_sigma=0.5)
CODING_AGENTS = {"claude-code": CLAUDE_CODE, "codex": CODEX}


def load_coding_agent(
    agent: str,
    options: BuildOptions | None = None,
    limit: int | None = None,
    path: str | Path | None = None,
) -> list[TraceProgram]:
    """The SWE-bench programs (default: the full shared file when present, else the
    embedded slice) with ``agent``'s pauses."""
    if agent not in CODING_AGENTS:
        known = ", ".join(CODING_AGENTS)
        raise ValueError(f"unknown coding agent {agent!r}; known: {known}")
    if path is None:
        # Imported here: arrivals imports this module for its named traces.
        from continuum_tiered.traces.arrivals import swebench_path

        path = swebench_path()
    # load_swebench's annotation says ToolDurations; it takes any DurationSampler.
    return load_swebench(path, CODING_AGENTS[agent], options, limit)  # type: ignore[arg-type]
