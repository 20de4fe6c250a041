"""Virtual-time replay of agent programs on vLLM's real scheduler.

The loop is the engine core's: add due requests, ``schedule()``, let the modelled GPU
take the step time of the scheduled batch, ``update_from_output()``. Only the forward
pass and the clock are modelled; admission, prefix caching, preemption and the KV
connectors are vLLM's and ours. Tool calls are pauses in virtual time: a program's next
turn arrives ``tool_duration_s`` after its previous turn finished.

``VirtualEngine`` is one replica, ``Arrivals`` the programs' turns in time order and
``Replicas`` the loop that feeds one or several engines on one clock (a cluster routes
each turn, :mod:`.cluster`).

A served turn also takes time outside the engine: the HTTP request, the API server's
request and response handling, the streamed reply and the client's own work, all on
cores the engine shares on a CPU build. The replay charges it as ``request_overhead_s``
per turn (measured against a server, see ``experiments/fidelity.py``): a turn is over for
its program that long after the engine's last step for it. Where the round trip splits
(before the scheduler sees a request, after its last token) moves only a program's first
entry: each later turn still enters the scheduler one round trip and one tool call after
the previous one finished.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable

from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from continuum_tiered.core.hints import ProgramHints
from continuum_tiered.sim.lmcache_model import SimLMCacheConnector
from continuum_tiered.sim.program_run import ProgramRun, ReplayHooks
from continuum_tiered.sim.scheduler_driver import ScheduledStep, SchedulerDriver
from continuum_tiered.sim.step_time import StepTimeModel
from continuum_tiered.traces.model import TraceProgram
from continuum_tiered.vllm.connectors.continuum_connector import ContinuumConnector
from continuum_tiered.vllm.connectors.tier_link import NoTiers

MAX_IDLE_STEPS = 3  # empty steps in a row before the clock jumps to the next arrival
STOP_TOKEN = 2  # prompts and other outputs use token ids from 3 up


class VirtualEngine:
    """One replica: vLLM's scheduler with its connectors, on its own clock. Turns are
    handed to it by ``submit``; ``advance`` runs one iteration of the engine core's loop
    and returns the turns that finished in it."""

    def __init__(
        self,
        driver: SchedulerDriver,
        step_time: StepTimeModel,
        hooks: ReplayHooks,
        vocab_size: int,
        seed: int = 0,
        request_overhead_s: float = 0.0,
        replica: int = 0,
    ):
        self.driver = driver
        self.scheduler = driver.scheduler
        self.step_time = step_time
        self.hooks = hooks
        self.vocab_size = vocab_size
        self.now = 0.0
        self.seed = seed
        self.request_overhead_s = request_overhead_s
        self.replica = replica
        self.busy_s = 0.0  # virtual time spent in steps
        # Blocks held (by requests or pins) integrated over steps, in blocks of the full
        # layout (every layer's KV): with the hybrid KV cache manager the pool's blocks
        # hold one group's layers each, so they are scaled by the bytes they hold.
        self.kv_block_seconds = 0.0
        self._full_blocks_per_block = driver.cfg.num_blocks / driver.block_pool.num_gpu_blocks
        self._idle_steps = 0
        self._by_request: dict[str, ProgramRun] = {}
        self._requests: dict[str, Request] = {}
        self._waiting_since: dict[str, float] = {}
        self._seconds_in_flight: deque[float] = deque()  # of the driver's steps in flight
        connectors = self._connectors()
        pins = next((c for c in connectors if isinstance(c, ContinuumConnector)), None)
        self.pin_connector = pins
        self.lmcache = next((c for c in connectors if isinstance(c, SimLMCacheConnector)), None)
        if self.lmcache is not None:
            self.lmcache.bind_clock(self._clock)
        if pins is not None:
            pins.bind_tiers(self.lmcache if self.lmcache is not None else NoTiers(self._clock))

    def _clock(self) -> float:
        return self.now

    def _connectors(self) -> list:
        connector = self.scheduler.connector
        if connector is None:
            return []
        return connector.sub_connectors if isinstance(connector, MultiConnector) else [connector]

    # ------------------------------------------------------- what a router sees

    def busy(self) -> bool:
        return self.scheduler.has_requests() or self.driver.steps_in_flight > 0

    def load(self) -> int:
        """Requests running or waiting."""
        return self.scheduler.get_num_unfinished_requests()

    def held_prefix_blocks(self, block_hashes: list) -> int:
        """Leading blocks of a prompt this replica holds: in its GPU prefix cache (pinned,
        in use or evictable) or in its own LMCache tiers."""
        pool = self.driver.block_pool
        local = self.lmcache.store if self.lmcache is not None else None
        held = 0
        for key in block_hashes:
            on_gpu = pool.get_cached_block(key, [0]) is not None
            if not (on_gpu or (local is not None and (key in local.cpu or key in local.disk))):
                break
            held += 1
        return held

    def serving(self) -> list[ProgramRun]:
        """The programs whose current turn this replica holds, running or waiting."""
        return list(self._by_request.values())

    # ------------------------------------------------------------------ loop

    def advance(self, next_event_s: float | None) -> list[tuple[ProgramRun, float]]:
        """One iteration of the engine core's loop (``busy()`` must hold): the turns that
        finished in it, each with when its program sees the reply. ``next_event_s``:
        when something next arrives; a replica that cannot run anything waits for it."""
        scheduler, driver = self.scheduler, self.driver
        finished: list[tuple[ProgramRun, float]] = []
        if not scheduler.has_requests():  # the engine core only waits for a step in flight
            self._complete(driver.oldest_in_flight(), self._seconds_in_flight.popleft(), finished)
            return finished
        step = self._schedule()
        if (done := driver.advance(step)) is not None:
            self._complete(done, self._seconds_in_flight.popleft(), finished)
        if step.output.total_num_scheduled_tokens:
            self._idle_steps = 0
            return finished
        self._idle_steps += 1
        if not scheduler.get_num_unfinished_requests() or self._idle_steps <= MAX_IDLE_STEPS:
            # A step can schedule nothing while a preemption or a pin release
            # settles; the next one runs. Time only moves when nothing does.
            return finished
        next_s = self._next_event_s(next_event_s)
        if next_s is None:
            waiting = [(r.request_id, r.num_tokens, r.status) for r in scheduler.waiting]
            raise RuntimeError(
                f"replay stalled at {self.now:.1f} s: nothing can run; waiting "
                f"{waiting[:5]}, running {len(scheduler.running)}, free blocks "
                f"{driver.block_pool.get_num_free_blocks()}"
            )
        self.now = max(self.now, next_s)
        self._idle_steps = 0  # what happens then (a load reported) needs its own steps
        return finished

    def _schedule(self) -> ScheduledStep:
        """Schedule a step and price it; it runs once the steps in flight are done."""
        step = self.driver.schedule()
        out = step.output
        start = self.now + sum(self._seconds_in_flight)
        for new in out.scheduled_new_reqs:
            run = self._by_request[new.req_id]
            if (since := self._waiting_since.pop(new.req_id, None)) is not None:
                run.queue_s += start - since
                run.hit_tokens += new.num_computed_tokens
        seconds = self._step_seconds(out, start) if out.total_num_scheduled_tokens else 0.0
        self._seconds_in_flight.append(seconds)
        return step

    def _complete(
        self, step: ScheduledStep, seconds: float, finished: list[tuple[ProgramRun, float]]
    ) -> None:
        """The step ran for ``seconds``: advance the clock and feed its output back."""
        pool = self.driver.block_pool
        held = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()  # less the null block
        self.busy_s += seconds
        self.kv_block_seconds += held * self._full_blocks_per_block * seconds
        self.now += seconds
        finished.extend(self._turn_finished(rid) for rid in self._feed_back(step))

    def _next_event_s(self, next_arrival_s: float | None) -> float | None:
        """When something next happens without a step: an arrival or an async load done."""
        times = [] if next_arrival_s is None else [next_arrival_s]
        if self.lmcache is not None and (load := self.lmcache.next_load_done()) is not None:
            times.append(load)
        return min(times, default=None)

    def submit(self, run: ProgramRun, at_s: float) -> None:
        """The program's current turn arrives at ``at_s`` (an idle replica's clock moves
        up to it; a busy one takes it after its step). A turn submitted again (its replica
        was lost) sends the same prompt."""
        self.now = max(self.now, at_s)
        turn = run.program.turns[run.turn]
        rng = random.Random(f"{self.seed}:{run.seq}:{run.turn}")
        fresh = turn.prompt_tokens - len(run.context)
        run.context += [rng.randrange(3, self.vocab_size) for _ in range(fresh)]
        rid = f"{run.program.program_id}#{run.turn}"
        last = run.turn == len(run.program.turns) - 1
        params = (
            ProgramHints(run.program.program_id, run.turn, last, turn.tool).to_params()
            if self.hooks.send_hints
            else None
        )
        if run.start_s is None:
            run.start_s = self.now
        run.holds_pin = (
            self.pin_connector is not None
            and self.pin_connector.pins.get(run.program.program_id) is not None
        )
        self._by_request[rid] = run
        self._waiting_since[rid] = self.now
        run.prompt_tokens += len(run.context)
        self._requests[rid] = self.driver.add_request(
            rid,
            run.context,
            max_tokens=turn.output_tokens + 1,  # it ends on STOP_TOKEN, unforeseen
            arrival_time=self.now,
            priority=self.hooks.priority(run),
            kv_transfer_params=params,
            prefix_block_hashes=run.block_hashes,
            stop_token_id=STOP_TOKEN,
        )

    def _step_seconds(self, out: SchedulerOutput, start: float) -> float:
        requests = self.scheduler.requests
        prefill: list[tuple[int, int]] = []
        decode: list[int] = []
        for rid, n in out.num_scheduled_tokens.items():
            request = requests[rid]
            offset = request.num_computed_tokens - n  # schedule() already advanced it
            if offset >= request.num_prompt_tokens:
                decode.append(offset)
            else:
                prefill.append((offset, n))
        seconds = self.step_time.step_s(prefill, decode)
        if self.lmcache is not None:
            seconds = self.lmcache.step_seconds(seconds, start)
        for rid in out.num_scheduled_tokens:
            self._by_request[rid].attained_s += seconds
        return seconds

    def _next_token(self, request: Request) -> int:
        """The turn's last output token is STOP_TOKEN: a turn ends where a model's would,
        on a token the scheduler does not see coming (with async scheduling it has
        already scheduled the next decode)."""
        run = self._by_request[request.request_id]
        if len(request.output_token_ids) + 1 >= run.program.turns[run.turn].output_tokens:
            return STOP_TOKEN
        return 3 + (request.num_tokens * 7919) % (self.vocab_size - 3)

    def _feed_back(self, step: ScheduledStep) -> list[str]:
        runner_out = self.driver.runner_output(step, self._next_token)
        if self.lmcache is not None and self.lmcache.async_transfers:
            received = self.lmcache.finished_loads(self.now)
            runner_out.kv_connector_output = KVConnectorOutput(finished_recving=received)
        engine_outputs = self.scheduler.update_from_output(step.output, runner_out)
        return [
            o.request_id
            for outs in engine_outputs.values()
            for o in outs.outputs
            if o.finish_reason is not None
        ]

    def _turn_finished(self, rid: str) -> tuple[ProgramRun, float]:
        """The run moved on to its next turn, and when the reply reaches its program."""
        run = self._by_request.pop(rid)
        request = self._requests.pop(rid)
        run.context += request.output_token_ids
        run.block_hashes = list(request.block_hashes)
        run.turn += 1
        return run, self.now + self.request_overhead_s


class Arrivals:
    """Every program's turns in time order: the first at the program's arrival, each
    later one a tool call after its program saw the previous reply."""

    def __init__(self, programs: list[TraceProgram]):
        ordered = sorted(programs, key=lambda p: p.arrival_s)
        self.runs = [ProgramRun(p, seq) for seq, p in enumerate(ordered)]
        self._events: list[tuple[float, int, int]] = [
            (p.arrival_s, seq, seq) for seq, p in enumerate(ordered)
        ]
        heapq.heapify(self._events)
        self._tiebreak = len(ordered)

    def next_s(self) -> float | None:
        return self._events[0][0] if self._events else None

    def pop(self) -> ProgramRun:
        return self.runs[heapq.heappop(self._events)[2]]

    def turn_done(self, run: ProgramRun, seen_s: float, on_done: Callable[[], None]) -> None:
        if run.turn == len(run.program.turns):
            run.end_s = seen_s
            run.context, run.block_hashes = [], []
            on_done()
            return
        tool_s = run.program.turns[run.turn - 1].tool_duration_s
        self._tiebreak += 1
        heapq.heappush(self._events, (seen_s + tool_s, self._tiebreak, run.seq))


Route = Callable[[ProgramRun, list[VirtualEngine]], VirtualEngine]


class Replicas:
    """Engines on one virtual clock, fed by one ``Arrivals`` through ``route``.

    Each engine advances by its own steps; the engine furthest behind moves next, and an
    arrival is routed once every busy engine has reached it, so the router sees each
    replica at most one step ahead of the arrival. With one engine this is the engine
    core's loop: add due requests, schedule, step."""

    def __init__(self, engines: list[VirtualEngine], arrivals: Arrivals, route: Route):
        self.live = list(engines)
        self.arrivals = arrivals
        self.route = route

    def run(self, on_program_done: Callable[[], None], until_s: float = math.inf) -> None:
        """Until every program is done, or until the next thing to happen is at or after
        ``until_s``."""
        # The busy engines by clock. Only its own step moves a busy engine's clock (a turn
        # routed to it arrives at or before it), so an entry stays valid until popped.
        behind = [(e.now, e.replica, e) for e in self.live if e.busy()]
        heapq.heapify(behind)
        while True:
            step_s = behind[0][0] if behind else math.inf
            arrival = self.arrivals.next_s()
            arrival_s = math.inf if arrival is None else arrival
            if min(step_s, arrival_s) >= until_s:  # with until_s infinite: nothing left
                return
            if arrival_s <= step_s:
                run = self.arrivals.pop()
                engine = self.route(run, self.live)
                idle = not engine.busy()
                engine.submit(run, arrival_s)
                if idle:
                    heapq.heappush(behind, (engine.now, engine.replica, engine))
                continue
            engine = heapq.heappop(behind)[2]
            next_s = min(arrival_s, until_s)
            for run, seen_s in engine.advance(None if next_s == math.inf else next_s):
                self.arrivals.turn_done(run, seen_s, on_program_done)
            if engine.busy():
                heapq.heappush(behind, (engine.now, engine.replica, engine))

    def remove(self, engine: VirtualEngine, at_s: float) -> list[ProgramRun]:
        """``engine`` is lost at ``at_s`` with all it held; the turns it was serving start
        over wherever ``route`` now sends them. Returns those turns' programs."""
        self.live.remove(engine)
        lost = sorted(engine.serving(), key=lambda run: run.seq)
        for run in lost:
            self.route(run, self.live).submit(run, at_s)
        return lost
