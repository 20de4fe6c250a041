"""A stateful fuzz of ``ContinuumConnector`` inside vLLM's real Scheduler and BlockPool.

One hypothesis ``RuleBasedStateMachine`` (``SchedulerFuzz``) drives random event sequences
through ``SchedulerDriver``: agent programs whose next turn extends their context (a prefix
hit on their pin) or diverges from it (context compaction, up to the whole pool), new
programs, last turns, aborts of running or waiting requests, requests without hints or with
malformed ones, engine steps, idle gaps that pass TTLs with or without a step, memory
pressure, preemption (bursts of long decodes in a small pool) and prefix-cache resets. The
clock is virtual (``Clock``): every engine step takes ``STEP_S`` seconds.

After every rule and every engine step it checks:

- ``refcount``: each block's ``ref_cnt`` equals the running requests holding it plus the
  pins holding it, only running requests hold blocks, and the pool's free count equals the
  blocks at zero references;
- ``pin``: pinned blocks are hashed (a pin the prefix cache cannot find is a leak);
- ``overdue-pin``: no pin past its deadline survives a step while its program has nothing
  waiting;
- ``ended-pin``: no pin of a program whose last turn finished survives a step;
- ``handover``: no pin of a program whose next turn is running;
- ``stall``: the engine makes progress: a step that schedules nothing while requests are
  unfinished happens at most once per pin it holds (each such step may release one) plus
  ``STALL_SLACK``; beyond that a waiting request is kept out by pins (admission deadlock) or
  running requests cannot grow. When only the waiting request's own program's pin stands
  in its way, the violation is ``own-pin-deadlock`` (a pin kept because its program waits);
- ``running-starved``: no step leaves a running request out (not preempted) while it
  admits a waiting or preempted one: blocks freed for the running batch must not go to
  newcomers (vLLM alone would preempt instead);
- ``reset``: ``reset_prefix_cache()`` succeeds when no request holds blocks, and with
  ``reset_running_requests=True`` it does not raise; ``reset-pin``: after a successful reset
  no pin is left and every block is free.

At teardown every request must finish within a bound (``drain``). Then, without releasing
any pin itself, it ends the live programs (half by a last turn, half by letting the clock
pass every deadline and stepping once) and checks ``leak``: no pin left, the pool's free
count back to its initial value, every block's ``ref_cnt`` zero, and the connector's
per-request bookkeeping empty (``bookkeeping``). An exception out of vLLM or the connector
is ``crash``.

``tests/test_scheduler_fuzz.py`` runs a short derandomized fuzz in CI and
``experiments/fuzz_scheduler.py`` a long one. When a sequence fails, hypothesis shrinks it
and prints the minimal one; its ``note`` lines are the same events as plain
``SchedulerDriver`` calls (see ``REPRO_PRELUDE``), so they can be pasted into a reproducer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from vllm.v1.request import Request, RequestStatus

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.core.profile import TierProfile
from continuum_tiered.policies import DEFAULT_POLICY, make_policy
from continuum_tiered.policies.base import RetentionPolicy
from continuum_tiered.policies.static_ttl import StaticTTLPolicy
from continuum_tiered.sim.scheduler_driver import DriverConfig, SchedulerDriver, build_vllm_config
from continuum_tiered.vllm.connectors.tier_link import NoTiers

BLOCK = 32
STEP_S = 0.05  # virtual seconds per engine step
START_S = 1_000.0
MIN_BLOCKS, MAX_BLOCKS = 40, 80  # the pool, block 0 (vLLM's null block) included
MAX_BATCHED_TOKENS = 512  # chunked prefill; the connector's pressure reserve is 16 blocks
MAX_NUM_SEQS = 16
STALL_SLACK = 3
SYSTEM_SEED = 999_999
TOOLS = (None, "grep", "pytest", "ls")
# Prefill at 0.5 s + 4 ms/token: cost-model policies then pin for seconds (a 320-token
# turn: ln(1.78 s) = 0.58 s cold-start TTL), where the tiny model's estimate gives 0.
SLOW_PREFILL = (0.5, 0.004, 0.0)

# Hints the connector must log and ignore, never raise on (PID stands for a live program).
MALFORMED_HINTS: tuple[dict[str, Any], ...] = (
    {"continuum": {"program_id": "PID", "turn": "first"}},
    {"continuum": {"program_id": "", "turn": 0}},
    {"continuum": {"program_id": "PID", "turn": -1}},
    {"continuum": {"program_id": "PID", "turn": True}},
    {"continuum": {"program_id": "PID", "turn": 1, "last_turn": "yes"}},
    {"continuum": {"program_id": "PID", "turn": 1, "tool": "rm -rf /"}},
    {"continuum": {"program_id": "PID", "turn": 1, "colour": "red"}},
    {"continuum": {"program_id": 7, "turn": 1}},
    {"continuum": "PID"},
    {"continuum": None},
)

REPRO_PRELUDE = """\
# To reproduce, run the note lines of the minimal sequence (the SchedulerDriver calls,
# not the state.* lines) after:
import tempfile
from pathlib import Path
from vllm.v1.request import RequestStatus
from continuum_tiered.lab.scheduler_fuzz import (
    SYSTEM, FuzzSetup, Variant, hints, new_driver, steps, tokens,
)
from continuum_tiered.core.tiny_model import write_tiny_llama
setup = FuzzSetup.build(write_tiny_llama(Path(tempfile.mkdtemp())), {variant!r})
"""


class Clock:
    """The connector's clock, moved by hand."""

    def __init__(self, now: float = START_S) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tokens(seed: int, n: int) -> list[int]:
    """``n`` random token ids; different seeds share no prefix block."""
    return random.Random(seed).choices(range(3, 500), k=n)


SYSTEM = tokens(SYSTEM_SEED, 256)  # a system prompt some programs share: pins share blocks


def hints(program_id: str, turn: int, last_turn: bool = False, tool: str | None = None):
    return ProgramHints(program_id, turn, last_turn, tool).to_params()


def steps(driver: SchedulerDriver, clock: Clock, n: int = 1) -> None:
    """``n`` engine steps of ``STEP_S`` virtual seconds each."""
    for _ in range(n):
        driver.step()
        clock.now += STEP_S


# ------------------------------------------------------------------------- invariants


class InvariantViolation(AssertionError):
    name: ClassVar[str] = "invariant"


def _violation(name: str, doc: str) -> type[InvariantViolation]:
    cls = type(f"Violation_{name.replace('-', '_')}", (InvariantViolation,), {"__doc__": doc})
    cls.name = name
    return cls


VIOLATIONS: dict[str, type[InvariantViolation]] = {
    cls.name: cls
    for cls in (
        _violation("refcount", "ref_cnt != running holders + pins, or a free count mismatch"),
        _violation("pin", "a pinned block without a hash"),
        _violation("overdue-pin", "a pin past its deadline, program not waiting, survived"),
        _violation("ended-pin", "a pin of a program whose last turn finished survived a step"),
        _violation("handover", "a pin of a program whose next turn is running"),
        _violation("stall", "the engine stopped making progress with requests unfinished"),
        _violation("own-pin-deadlock", "a request waits forever behind its own program's pin"),
        _violation("running-starved", "a running request was left out while one was admitted"),
        _violation("drain", "requests did not finish within the bound at teardown"),
        _violation("reset", "reset_prefix_cache failed or raised with only pins holding blocks"),
        _violation("reset-pin", "a pin or a used block survived a successful reset"),
        _violation("leak", "blocks or pins left after every program ended"),
        _violation("bookkeeping", "the connector kept per-request state after all finished"),
        _violation("crash", "vLLM or the connector raised"),
    )
}


class _Stop(Exception):
    """A tolerated violation ended this sequence."""


# ---------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Variant:
    """``policy``: a retention policy name. ``profile``: "estimate" is the connector's own
    default (the roofline of the tiny test model: prefill is nearly free, so cost-model
    TTLs stay 0 until queueing delays are learnt); "slow" replaces its prefill curve by
    ``SLOW_PREFILL`` so cost-model policies pin. ``static-ttl`` draws its TTL per
    sequence. ``scheduling``: "priority" (program FCFS, as served) or "fcfs"."""

    policy: str = "tiered"
    profile: str = "slow"
    scheduling: str = "priority"

    def __post_init__(self) -> None:
        if self.profile not in ("estimate", "slow"):
            raise ValueError(f"profile must be estimate or slow, not {self.profile!r}")
        if self.scheduling not in ("priority", "fcfs"):
            raise ValueError(f"scheduling must be priority or fcfs, not {self.scheduling!r}")

    def make_policy(self, connector: Any, ttl_s: float) -> RetentionPolicy | None:
        """The policy to put on ``connector``; None keeps the one its config built."""
        if self.policy == "static-ttl":
            return StaticTTLPolicy(ttl_s)
        profile: TierProfile = connector.options.profile
        if self.profile == "slow":
            profile = dataclasses.replace(profile, prefill_coeffs=SLOW_PREFILL)
        elif connector.policy.name == self.policy:
            return None
        return make_policy(self.policy, profile)


@dataclass
class FuzzStats:
    sequences: int = 0
    rules: int = 0
    engine_steps: int = 0
    sequences_with_pins: int = 0
    pins_created: int = 0
    pin_handovers: int = 0
    pinned_prefix_hit_tokens: int = 0
    pressure_releases: int = 0
    expirations: int = 0
    preemptions: int = 0
    aborts: int = 0
    resets_ok: int = 0
    tolerated: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        tolerated = ", ".join(f"{k}: {v}" for k, v in sorted(self.tolerated.items()))
        return (
            f"{self.sequences} sequences, {self.rules} rules, {self.engine_steps} engine steps; "
            f"{self.sequences_with_pins} sequences pinned ({self.pins_created} pins, "
            f"{self.pin_handovers} hand-overs, {self.pinned_prefix_hit_tokens} hit tokens on "
            f"pins, {self.pressure_releases} pressure releases, {self.expirations} "
            f"expirations); {self.preemptions} preemptions, {self.aborts} aborts, "
            f"{self.resets_ok} successful resets"
            + (f"; tolerated violations: {tolerated}" if tolerated else "")
        )


@dataclass
class FuzzSetup:
    """What every sequence shares: the vLLM config (built once: it takes seconds)."""

    cfg: DriverConfig
    vllm_config: Any
    variant: Variant
    tolerate: frozenset[str] = frozenset()
    stats: FuzzStats = field(default_factory=FuzzStats)
    on_sequence: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tolerate) - set(VIOLATIONS))
        if unknown:
            raise ValueError(f"unknown invariants {unknown}; known: {sorted(VIOLATIONS)}")

    @classmethod
    def build(
        cls, model_dir: Path, variant: Variant, tolerate: frozenset[str] = frozenset()
    ) -> FuzzSetup:
        cfg = DriverConfig(
            model_dir=Path(model_dir),
            num_blocks=MAX_BLOCKS,
            block_size=BLOCK,
            max_model_len=MAX_BLOCKS * BLOCK,
            max_num_batched_tokens=MAX_BATCHED_TOKENS,
            max_num_seqs=MAX_NUM_SEQS,
            scheduling_policy=variant.scheduling,
            kv_transfer_config={
                "kv_connector": "ContinuumConnector",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"policy": DEFAULT_POLICY},
            },
        )
        with quiet_logs():
            vllm_config = build_vllm_config(cfg)
        return cls(cfg, vllm_config, variant, frozenset(tolerate))

    def derive(self, variant: Variant, tolerate: frozenset[str] = frozenset()) -> FuzzSetup:
        """Another variant on the same vLLM config (its scheduling policy must match)."""
        if variant.scheduling != self.variant.scheduling:
            raise ValueError("a variant with other scheduling needs its own FuzzSetup.build")
        return FuzzSetup(self.cfg, self.vllm_config, variant, frozenset(tolerate))

    def machine(self) -> type[SchedulerFuzz]:
        """A ``SchedulerFuzz`` bound to this setup, for ``run_state_machine_as_test``."""
        return type("SchedulerFuzz", (SchedulerFuzz,), {"setup": self})


def new_driver(setup: FuzzSetup, num_blocks: int, ttl_s: float) -> tuple[SchedulerDriver, Clock]:
    """A fresh scheduler with ``num_blocks`` blocks, the variant's policy and a virtual clock."""
    driver = SchedulerDriver(
        dataclasses.replace(setup.cfg, num_blocks=num_blocks), setup.vllm_config
    )
    clock = Clock()
    driver.connector.bind_tiers(NoTiers(clock))
    policy = setup.variant.make_policy(driver.connector, ttl_s)
    if policy is not None:
        driver.connector.policy = policy
    return driver, clock


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """vLLM's and the connector's per-request logs cost more than the fuzz itself."""
    loggers = [logging.getLogger(name) for name in ("vllm", "continuum_tiered")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------------------- model


@dataclass
class ProgramModel:
    program_id: str
    priority: int
    turn: int = 0
    context: list[int] | None = None  # prompt + output of its last finished turn
    context_expr: str = ""
    in_flight: RequestModel | None = None
    ended: bool = False
    retries: int = 0


@dataclass
class RequestModel:
    request_id: str
    var: str  # its Python name in the reproducer
    prompt: list[int]
    prompt_expr: str
    max_tokens: int
    request: Request
    program: ProgramModel | None = None
    last_turn: bool = False


def _var(request_id: str) -> str:
    return "r_" + request_id.replace("-", "_")


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Rules do nothing once a tolerated violation ended the sequence; a real failure is
    remembered so that teardown does not pile its own on top."""

    @functools.wraps(fn)
    def wrapper(self: SchedulerFuzz, *args: Any, **kwargs: Any) -> None:
        if self.stopped or self.failed:
            return
        self.setup.stats.rules += 1
        try:
            fn(self, *args, **kwargs)
        except _Stop:
            self.stopped = True
        except BaseException:
            self.failed = True
            raise

    return wrapper


def _has_idle_program(self: SchedulerFuzz) -> bool:
    return any(p.in_flight is None and not p.ended for p in self.programs.values())


def _has_unfinished(self: SchedulerFuzz) -> bool:
    return bool(self.unfinished)


def _ready(self: SchedulerFuzz) -> bool:
    return self.driver is not None


# ---------------------------------------------------------------------------- machine


class SchedulerFuzz(RuleBasedStateMachine):
    setup: ClassVar[FuzzSetup]

    def __init__(self) -> None:
        super().__init__()
        self.driver: SchedulerDriver | None = None
        self.clock = Clock()
        self.stopped = False
        self.failed = False
        self.programs: dict[str, ProgramModel] = {}
        self.requests: dict[str, RequestModel] = {}
        self.unfinished: dict[str, RequestModel] = {}
        self.next_seed = 1
        self.next_id = 0
        self.pending_steps = 0
        self.no_progress = 0
        self.pins_at_stall_start = 0
        self.initial_free = 0
        self.cap_tokens = 0
        self.setup.stats.sequences += 1
        self.setup.on_sequence()

    # ------------------------------------------------------------------ helpers

    def _note(self, line: str) -> None:
        """Record an event of the reproducer; engine steps are coalesced."""
        if self.pending_steps:
            note(f"steps(d, clock, {self.pending_steps})")
            self.pending_steps = 0
        if line:
            note(line)

    def _fail(self, name: str, message: str) -> None:
        self._note("")
        if name in self.setup.tolerate:
            self.setup.stats.tolerated[name] += 1
            raise _Stop
        raise VIOLATIONS[name](message)

    def _seed(self) -> int:
        self.next_seed += 1
        return self.next_seed

    def _fresh(self, n: int) -> tuple[list[int], str]:
        seed = self._seed()
        return tokens(seed, n), f"tokens({seed}, {n})"

    @property
    def connector(self) -> Any:
        assert self.driver is not None
        return self.driver.connector

    def _unfinished(self) -> list[RequestModel]:
        return list(self.unfinished.values())

    def _fit(self, prefix: int, new: int, max_tokens: int) -> tuple[int, int]:
        """Clamp (new tokens, max_tokens) so that the request fits the pool on its own."""
        max_tokens = max(1, min(max_tokens, self.cap_tokens - prefix - 1))
        new = max(1 if prefix == 0 else 0, min(new, self.cap_tokens - prefix - max_tokens))
        return new, max_tokens

    def _submit(
        self,
        request_id: str,
        prompt: list[int],
        prompt_expr: str,
        max_tokens: int,
        priority: int,
        params: dict[str, Any] | None,
        program: ProgramModel | None = None,
        last_turn: bool = False,
    ) -> RequestModel:
        assert self.driver is not None and len(prompt) + max_tokens <= self.cap_tokens
        var = _var(request_id)
        self._note(
            f"{var} = d.add_request({request_id!r}, {prompt_expr}, {max_tokens}, clock.now, "
            f"priority={priority}, kv_transfer_params={params!r})"
        )
        try:
            request = self.driver.add_request(
                request_id,
                prompt,
                max_tokens,
                arrival_time=self.clock.now,
                priority=priority,
                kv_transfer_params=params,
            )
        except Exception as err:
            raise VIOLATIONS["crash"](f"add_request({request_id!r}) raised {err!r}") from err
        model = RequestModel(
            request_id, var, prompt, prompt_expr, max_tokens, request, program, last_turn
        )
        self.requests[request_id] = model
        self.unfinished[request_id] = model
        if program is not None:
            program.in_flight = model
        return model

    def _submit_turn(
        self,
        program: ProgramModel,
        prompt: list[int],
        prompt_expr: str,
        max_tokens: int,
        tool: str | None,
        last_turn: bool,
    ) -> None:
        request_id = f"{program.program_id}-{program.turn}"
        if program.retries:
            request_id += f"r{program.retries}"
        params = hints(program.program_id, program.turn, last_turn, tool)
        self._submit(
            request_id,
            prompt,
            prompt_expr,
            max_tokens,
            program.priority,
            params,
            program,
            last_turn,
        )

    def _new_program(self) -> ProgramModel:
        program_id = f"P{len(self.programs)}"
        program = ProgramModel(program_id, priority=int(self.clock.now * 1000))
        self.programs[program_id] = program
        return program

    def _step(self) -> None:
        """One engine step, then the per-step invariants."""
        assert self.driver is not None
        t_sched = self.clock.now
        running_before = [r.request_id for r in self.driver.scheduler.running]
        self.pending_steps += 1
        try:
            result = self.driver.step()
        except Exception as err:
            self._note("")
            raise VIOLATIONS["crash"](f"an engine step raised {err!r}") from err
        self.clock.now += STEP_S
        self.setup.stats.engine_steps += 1
        for request_id in result.finished_request_ids:
            self._finished(request_id)
        self._check_refcounts()
        self._check_pins_after_step(t_sched)
        self._check_running_not_starved(result.scheduler_output, running_before)
        self._check_progress(bool(result.scheduler_output.num_scheduled_tokens))

    def _check_running_not_starved(self, out: Any, running_before: list[str]) -> None:
        """A running request left out of a step (not preempted, still running) while a
        request was admitted: the blocks freed for the running batch went to a newcomer.
        vLLM alone never does that (a running request that cannot grow preempts one);
        only a connector answering ``has_pending_block_frees`` can make it."""
        admitted = [n.req_id for n in out.scheduled_new_reqs]
        admitted += sorted(out.scheduled_cached_reqs.resumed_req_ids)
        if not admitted:
            return
        skipped = [
            request_id
            for request_id in running_before
            if request_id not in out.num_scheduled_tokens
            and self.requests[request_id].request.status == RequestStatus.RUNNING
        ]
        if skipped:
            self._fail(
                "running-starved",
                f"running {skipped} got no tokens in a step that admitted {admitted}; "
                + self._describe(),
            )

    def _finished(self, request_id: str) -> None:
        model = self.unfinished.pop(request_id, None)
        if model is None or model.program is None:
            return
        program = model.program
        if program.in_flight is model:
            program.in_flight = None
        if model.request.status == RequestStatus.FINISHED_ABORTED:
            return
        program.context = list(model.request.all_token_ids)
        program.context_expr = f"list({model.var}.all_token_ids)"
        program.turn += 1
        program.retries = 0
        if model.last_turn:
            program.ended = True

    def _program_waiting(self, program_id: str) -> bool:
        program = self.programs.get(program_id)
        return (
            program is not None
            and program.in_flight is not None
            and program.in_flight.request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        )

    def _describe(self) -> str:
        assert self.driver is not None
        pool = self.driver.block_pool
        sched = self.driver.scheduler
        pins = [
            f"{p.program_id}: {p.num_blocks} blocks, deadline in "
            f"{p.deadline_s - self.clock.now:+.2f} s"
            f"{' (waiting)' if self._program_waiting(p.program_id) else ''}"
            for p in self.connector.pins
        ]
        waiting = [
            f"{r.request_id} ({r.num_tokens} tokens, {r.status.name})"
            for r in list(sched.waiting) + list(getattr(sched, "kv_holding_waiting", ()))
        ]
        running = [f"{r.request_id} ({r.num_tokens} tokens)" for r in sched.running]
        return (
            f"pool {len(pool.blocks)} blocks, {pool.get_num_free_blocks()} free; "
            f"pins [{'; '.join(pins)}]; running [{', '.join(running)}]; "
            f"waiting [{', '.join(waiting)}]"
        )

    # ------------------------------------------------------------- invariants

    def _check_refcounts(self) -> None:
        assert self.driver is not None
        pool = self.driver.block_pool
        running = {r.request_id for r in self.driver.scheduler.running}
        expected: Counter[int] = Counter()
        for request_id, blocks in self.driver.blocks_held_by_requests().items():
            if request_id not in running:
                self._fail(
                    "refcount",
                    f"request {request_id} holds {len(blocks)} blocks but is not running; "
                    + self._describe(),
                )
            expected.update(b.block_id for b in blocks if not b.is_null)
        for pin in self.connector.pins:
            expected.update(b.block_id for b in pin.blocks)
        wrong = [
            (b.block_id, b.ref_cnt, expected[b.block_id])
            for b in pool.blocks[1:]
            if b.ref_cnt != expected[b.block_id]
        ]
        if wrong:
            self._fail(
                "refcount",
                f"(block, ref_cnt, running holders + pins) differ: {wrong[:8]}; "
                + self._describe(),
            )
        zero = sum(1 for b in pool.blocks[1:] if b.ref_cnt == 0)
        if zero != pool.get_num_free_blocks():
            self._fail(
                "refcount",
                f"{zero} blocks at ref_cnt 0 but the pool counts {pool.get_num_free_blocks()} free",
            )

    def _check_pins_after_step(self, t_sched: float) -> None:
        for pin in list(self.connector.pins):
            program = self.programs.get(pin.program_id)
            if pin.deadline_s < t_sched and not self._program_waiting(pin.program_id):
                self._fail(
                    "overdue-pin",
                    f"pin of {pin.program_id} is {t_sched - pin.deadline_s:.3f} s past its "
                    f"deadline with nothing of its program waiting; " + self._describe(),
                )
            if program is not None and program.ended:
                self._fail(
                    "ended-pin",
                    f"pin of {pin.program_id} survived its last turn; " + self._describe(),
                )
            running = program is not None and program.in_flight is not None
            if running and program.in_flight.request.status == RequestStatus.RUNNING:
                self._fail(
                    "handover",
                    f"{pin.program_id}'s turn {program.in_flight.request_id} runs and its "
                    "pin is still held; " + self._describe(),
                )

    def _check_progress(self, progressed: bool) -> None:
        if progressed or not self.unfinished:
            self.no_progress = 0
            return
        if self.no_progress == 0:
            self.pins_at_stall_start = len(self.connector.pins)
        self.no_progress += 1
        if self.no_progress > self.pins_at_stall_start + STALL_SLACK:
            name, why = self._diagnose_stall()
            self._fail(
                name,
                f"{self.no_progress} engine steps scheduled nothing with "
                f"{len(self.unfinished)} requests unfinished: {why}; " + self._describe(),
            )

    def _diagnose_stall(self) -> tuple[str, str]:
        """Which pins keep the first waiting request out: other programs' ("stall") or
        only its own program's ("own-pin-deadlock")."""
        assert self.driver is not None
        sched = self.driver.scheduler
        if sched.running:
            return "stall", "running requests cannot grow"
        if not sched.waiting:
            return "stall", "no request is running or waiting"
        request = sched.waiting.peek_request()
        pool = self.driver.block_pool
        hits = []  # the prefix the allocation would find cached (never the last token)
        for block_hash in request.block_hashes[: (request.num_tokens - 1) // BLOCK]:
            found = pool.get_cached_block(block_hash, [0])
            if not found:
                break
            hits.append(found[0])
        hit_tokens = len(hits) * BLOCK
        # vLLM admits a request only when its first chunk fits and, with
        # scheduler_reserve_full_isl (the default), its whole prompt.
        tokens_to_fit = min(request.num_tokens, hit_tokens + MAX_BATCHED_TOKENS)
        if getattr(sched, "scheduler_reserve_full_isl", False):
            tokens_to_fit = request.num_tokens
        need = (
            math.ceil(tokens_to_fit / BLOCK)
            - len(hits)
            + sum(1 for b in hits if b.ref_cnt == 0)  # cached but free: taken from the pool
        )
        model = self.requests.get(request.request_id)
        own_id = model.program.program_id if model and model.program else None
        pin_refs: Counter[int] = Counter()
        own_blocks: set[int] = set()
        for pin in self.connector.pins:
            pin_refs.update(b.block_id for b in pin.blocks)
            if pin.program_id == own_id:
                own_blocks.update(b.block_id for b in pin.blocks)
        hit_ids = {b.block_id for b in hits}
        pinned_only = [
            b.block_id
            for b in pool.blocks[1:]
            if b.ref_cnt and b.ref_cnt == pin_refs[b.block_id] and b.block_id not in hit_ids
        ]
        by_own = sum(1 for block_id in pinned_only if block_id in own_blocks)
        by_others = len(pinned_only) - by_own
        free = pool.get_num_free_blocks()
        why = (
            f"{request.request_id} needs {need} blocks to be admitted ({len(hits)} "
            f"blocks hit), {free} free, {by_others} held only by other programs' pins, "
            f"{by_own} only by its own program's pin"
        )
        if free < need <= free + by_others:
            return "stall", why + ": releasing other programs' pins would admit it"
        if free + by_others < need <= free + by_others + by_own:
            return "own-pin-deadlock", why + ": only releasing its own program's pin would"
        return "stall", why

    @invariant()
    def block_accounting(self) -> None:
        if self.driver is None or self.stopped or self.failed:
            return
        try:
            self._check_block_accounting()
        except _Stop:
            self.stopped = True
        except BaseException:
            self.failed = True
            raise

    def _check_block_accounting(self) -> None:
        self._check_refcounts()
        for pin in self.connector.pins:
            if any(b.block_hash is None for b in pin.blocks):
                self._fail("pin", f"pin of {pin.program_id} holds unhashed blocks")

    # ------------------------------------------------------------------- rules

    @initialize(
        num_blocks=st.integers(MIN_BLOCKS, MAX_BLOCKS), ttl_s=st.sampled_from([2.0, 0.3, 30.0])
    )
    @_guarded
    def start(self, num_blocks: int, ttl_s: float) -> None:
        self._note(f"d, clock = new_driver(setup, num_blocks={num_blocks}, ttl_s={ttl_s})")
        self.driver, self.clock = new_driver(self.setup, num_blocks, ttl_s)
        self.initial_free = self.driver.block_pool.get_num_free_blocks()
        self.cap_tokens = (num_blocks - 1) * BLOCK

    @precondition(_ready)
    @rule(
        system=st.sampled_from([0, 64, 200]),
        length=st.integers(1, 2600),
        max_tokens=st.integers(1, 48),
        tool=st.sampled_from(TOOLS),
        last_turn=st.sampled_from([False, False, False, True]),
    )
    @_guarded
    def new_program(
        self, system: int, length: int, max_tokens: int, tool: str | None, last_turn: bool
    ) -> None:
        program = self._new_program()
        system = min(system, self.cap_tokens // 2)
        length, max_tokens = self._fit(system, length, max_tokens)
        fresh, expr = self._fresh(length)
        prompt_expr = f"SYSTEM[:{system}] + {expr}" if system else expr
        self._submit_turn(
            program, SYSTEM[:system] + fresh, prompt_expr, max_tokens, tool, last_turn
        )

    @precondition(_ready)
    @rule(
        count=st.integers(2, 6),
        length=st.integers(32, 400),
        max_tokens=st.integers(16, 64),
    )
    @_guarded
    def burst_of_long_decodes(self, count: int, length: int, max_tokens: int) -> None:
        """Concurrent programs decoding long replies: in a small pool, preemption."""
        for _ in range(count):
            program = self._new_program()
            new, mt = self._fit(0, length, max_tokens)
            fresh, expr = self._fresh(new)
            self._submit_turn(program, fresh, expr, mt, "pytest", False)

    @precondition(lambda self: _ready(self) and _has_idle_program(self))
    @rule(
        pick=st.integers(0, 1000),
        extra=st.integers(0, 600),
        max_tokens=st.integers(1, 64),
        tool=st.sampled_from(TOOLS),
        last_turn=st.sampled_from([False, False, False, True]),
    )
    @_guarded
    def next_turn_extends(
        self, pick: int, extra: int, max_tokens: int, tool: str | None, last_turn: bool
    ) -> None:
        """The next turn's prompt is the whole context plus new tokens: a hit on the pin."""
        program = self._pick_idle(pick)
        context = program.context or []
        if len(context) + 1 + max(1, extra) > self.cap_tokens:
            # No room to grow: the agent compacts its context instead.
            self._diverge(program, len(context) // 2, extra, max_tokens, tool, last_turn)
            return
        extra, max_tokens = self._fit(len(context), max(1, extra), max_tokens)
        fresh, expr = self._fresh(extra)
        prompt_expr = f"{program.context_expr} + {expr}" if context else expr
        self._submit_turn(program, context + fresh, prompt_expr, max_tokens, tool, last_turn)

    @precondition(lambda self: _ready(self) and _has_idle_program(self))
    @rule(
        pick=st.integers(0, 1000),
        keep=st.integers(0, 2600),
        new=st.integers(1, 2600),
        max_tokens=st.integers(1, 64),
        tool=st.sampled_from(TOOLS),
        last_turn=st.sampled_from([False, False, False, True]),
    )
    @_guarded
    def next_turn_diverges(
        self, pick: int, keep: int, new: int, max_tokens: int, tool: str | None, last_turn: bool
    ) -> None:
        """Context compaction: the prompt keeps only ``keep`` tokens of the context (of the
        pinned prefix) and continues differently, up to the whole pool."""
        program = self._pick_idle(pick)
        self._diverge(program, keep, new, max_tokens, tool, last_turn)

    def _diverge(
        self,
        program: ProgramModel,
        keep: int,
        new: int,
        max_tokens: int,
        tool: str | None,
        last_turn: bool,
    ) -> None:
        context = program.context or []
        keep = min(keep, len(context), self.cap_tokens - 2)
        new, max_tokens = self._fit(keep, new, max_tokens)
        if keep + new == 0:
            new = 1
        fresh, expr = self._fresh(new)
        prompt_expr = f"({program.context_expr})[:{keep}] + {expr}" if keep else expr
        self._submit_turn(program, context[:keep] + fresh, prompt_expr, max_tokens, tool, last_turn)

    @precondition(lambda self: _ready(self) and _has_idle_program(self))
    @rule(pick=st.integers(0, 1000), extra=st.integers(1, 200))
    @_guarded
    def last_turn(self, pick: int, extra: int) -> None:
        """The program's last turn: its pin must go when the turn is allocated or ends."""
        program = self._pick_idle(pick)
        context = program.context or []
        if len(context) + 2 > self.cap_tokens:
            self._diverge(program, len(context) // 2, extra, 1, None, True)
            return
        extra, max_tokens = self._fit(len(context), extra, 1)
        fresh, expr = self._fresh(max(1, extra))
        prompt_expr = f"{program.context_expr} + {expr}" if context else expr
        self._submit_turn(program, context + fresh, prompt_expr, max_tokens, None, True)

    def _pick_idle(self, pick: int) -> ProgramModel:
        idle = [p for p in self.programs.values() if p.in_flight is None and not p.ended]
        return idle[pick % len(idle)]

    @precondition(_ready)
    @rule(
        length=st.integers(1, 2600),
        max_tokens=st.integers(1, 64),
        on_program=st.integers(-1, 1000),
    )
    @_guarded
    def request_without_hints(self, length: int, max_tokens: int, on_program: int) -> None:
        """A plain request; with ``on_program`` >= 0 it extends some program's context, so
        it shares (and takes references on) that program's pinned blocks."""
        prefix, prefix_expr = self._some_context(on_program)
        length, max_tokens = self._fit(len(prefix), length, max_tokens)
        fresh, expr = self._fresh(length)
        self.next_id += 1
        self._submit(
            f"plain-{self.next_id}",
            prefix + fresh,
            f"{prefix_expr} + {expr}" if prefix else expr,
            max_tokens,
            int(self.clock.now * 1000),
            None,
        )

    def _some_context(self, pick: int) -> tuple[list[int], str]:
        with_context = [p for p in self.programs.values() if p.context]
        if pick < 0 or not with_context:
            return [], ""
        program = with_context[pick % len(with_context)]
        assert program.context is not None
        return program.context[
            : self.cap_tokens - 2
        ], f"({program.context_expr})[:{self.cap_tokens - 2}]"

    @precondition(_ready)
    @rule(
        kind=st.integers(0, len(MALFORMED_HINTS) - 1),
        length=st.integers(1, 800),
        on_program=st.integers(-1, 1000),
    )
    @_guarded
    def request_with_malformed_hints(self, kind: int, length: int, on_program: int) -> None:
        """Malformed hints, naming a live program where they name one: logged, ignored."""
        prefix, prefix_expr = self._some_context(on_program)
        live = [p.program_id for p in self.programs.values() if not p.ended] or ["P99"]
        program_id = live[max(on_program, 0) % len(live)]
        params = _replace_pid(MALFORMED_HINTS[kind], program_id)
        length, max_tokens = self._fit(len(prefix), length, 2)
        fresh, expr = self._fresh(length)
        self.next_id += 1
        self._submit(
            f"bad-{self.next_id}",
            prefix + fresh,
            f"{prefix_expr} + {expr}" if prefix else expr,
            max_tokens,
            int(self.clock.now * 1000),
            params,
        )

    @precondition(lambda self: _ready(self) and _has_unfinished(self))
    @rule(pick=st.integers(0, 1000), running=st.booleans())
    @_guarded
    def abort(self, pick: int, running: bool) -> None:
        """Abort a running (or, when none or ``running`` is False, a waiting) request."""
        assert self.driver is not None
        unfinished = self._unfinished()
        wanted = [
            r for r in unfinished if (r.request.status == RequestStatus.RUNNING) == running
        ] or unfinished
        model = wanted[pick % len(wanted)]
        self._note(
            f"d.scheduler.finish_requests([{model.request_id!r}], RequestStatus.FINISHED_ABORTED)"
        )
        try:
            self.driver.scheduler.finish_requests(
                [model.request_id], RequestStatus.FINISHED_ABORTED
            )
        except Exception as err:
            raise VIOLATIONS["crash"](f"aborting {model.request_id} raised {err!r}") from err
        self.setup.stats.aborts += 1
        self.unfinished.pop(model.request_id, None)
        if model.program is not None and model.program.in_flight is model:
            model.program.in_flight = None
            model.program.retries += 1

    @precondition(_ready)
    @rule(n=st.integers(1, 8))
    @_guarded
    def step(self, n: int) -> None:
        for _ in range(n):
            self._step()

    @precondition(_ready)
    @rule(n=st.integers(5, 40))
    @_guarded
    def run_a_while(self, n: int) -> None:
        for _ in range(n):
            self._step()
            if not self.unfinished:
                return

    @precondition(_ready)
    @rule(gap_s=st.sampled_from([0.5, 0.02, 3.0, 60.0, 3600.0]), then_step=st.booleans())
    @_guarded
    def idle_gap(self, gap_s: float, then_step: bool) -> None:
        """Time passes (tool calls run) with or without an engine step after it."""
        self._note(f"clock.now += {gap_s}")
        self.clock.now += gap_s
        if then_step:
            self._step()

    @precondition(_ready)
    @rule(reset_running_requests=st.booleans())
    @_guarded
    def reset_prefix_cache(self, reset_running_requests: bool) -> None:
        assert self.driver is not None
        holders = self.driver.blocks_held_by_requests()
        before = self._describe()
        self._note(
            f"ok = d.scheduler.reset_prefix_cache(reset_running_requests={reset_running_requests})"
        )
        try:
            ok = self.driver.scheduler.reset_prefix_cache(
                reset_running_requests=reset_running_requests
            )
        except RuntimeError as err:
            self._fail(
                "reset",
                f"reset_prefix_cache(reset_running_requests=True) raised {err!r}; before: "
                + before,
            )
            return
        except Exception as err:
            raise VIOLATIONS["crash"](f"reset_prefix_cache raised {err!r}") from err
        if ok:
            self.setup.stats.resets_ok += 1
            pool = self.driver.block_pool
            if len(self.connector.pins) or pool.get_num_free_blocks() != self.initial_free:
                self._fail("reset-pin", "a successful reset left " + self._describe())
        elif not holders and len(self.connector.pins):
            self._fail(
                "reset",
                "reset_prefix_cache() returned False with no request holding blocks: " + before,
            )

    # ---------------------------------------------------------------- teardown

    def teardown(self) -> None:
        try:
            if self.driver is not None and not (self.failed or self.stopped):
                with contextlib.suppress(_Stop):
                    self._drain()
                    self._end_all_programs()
        finally:
            self._record_stats()

    def _drain(self) -> None:
        unfinished = self._unfinished()
        bound = 100 + sum(3 * (math.ceil(len(r.prompt) / BLOCK) + r.max_tokens) for r in unfinished)
        for _ in range(bound):
            if not self.unfinished:
                return
            self._step()
        if self._unfinished():
            self._fail(
                "drain",
                f"{len(self._unfinished())} requests unfinished after {bound} steps; "
                + self._describe(),
            )

    def _end_all_programs(self) -> None:
        assert self.driver is not None
        self._step()  # idle: whatever is overdue must go (checked after the step)
        live = [p for p in self.programs.values() if not p.ended]
        for program in live[::2]:
            context = program.context or []
            if len(context) + 2 > self.cap_tokens:
                self._diverge(program, len(context) // 2, 8, 1, None, True)
            else:
                fresh, expr = self._fresh(8 if len(context) + 9 <= self.cap_tokens else 1)
                expr = f"{program.context_expr} + {expr}" if context else expr
                self._submit_turn(program, context + fresh, expr, 1, None, True)
        self._drain()
        deadlines = [pin.deadline_s for pin in self.connector.pins]
        if deadlines:
            gap = max(deadlines) + 1.0 - self.clock.now
            self._note(f"clock.now += {gap}")
            self.clock.now += gap
            self._step()
        pool = self.driver.block_pool
        referenced = [(b.block_id, b.ref_cnt) for b in pool.blocks[1:] if b.ref_cnt]
        if (
            len(self.connector.pins)
            or referenced
            or pool.get_num_free_blocks() != self.initial_free
        ):
            self._fail(
                "leak",
                f"after every program ended: {len(self.connector.pins)} pins, blocks with "
                f"references {referenced[:8]}, {pool.get_num_free_blocks()} free of "
                f"{self.initial_free}; " + self._describe(),
            )
        leftovers = {
            name: getattr(self.connector, name)
            for name in ("_requests", "_hints", "_unallocated", "_waiting_per_program")
            if getattr(self.connector, name, None)
        }
        if leftovers:
            self._fail(
                "bookkeeping", f"connector state left after every request ended: {leftovers}"
            )

    def _record_stats(self) -> None:
        if self.driver is None:
            return
        stats = self.setup.stats
        pins = self.connector.pins
        created = pins.pins_created
        stats.pins_created += created
        stats.sequences_with_pins += bool(created)
        stats.pin_handovers += self.connector._counters.get("pin_handovers", 0)
        stats.pinned_prefix_hit_tokens += self.connector._counters.get(
            "pinned_prefix_hit_tokens", 0
        )
        stats.pressure_releases += pins.releases.get(_reason("PRESSURE"), 0)
        stats.expirations += pins.releases.get(_reason("EXPIRED"), 0)
        stats.preemptions += sum(r.request.num_preemptions for r in self.requests.values())


def _reason(name: str) -> Any:
    from continuum_tiered.core.pins import ReleaseReason

    return ReleaseReason[name]


def _replace_pid(params: Any, program_id: str) -> Any:
    if params == "PID":
        return program_id
    if isinstance(params, dict):
        return {k: _replace_pid(v, program_id) for k, v in params.items()}
    return params
