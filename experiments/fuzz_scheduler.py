"""Fuzz ``ContinuumConnector`` in vLLM's real Scheduler and BlockPool for a long run.

Runs ``--sequences`` random event sequences (default 10,000) of the state machine in
``continuum_tiered.lab.scheduler_fuzz`` (the one ``tests/test_scheduler_fuzz.py`` runs briefly in
CI)
with the retention policy ``--policy`` (default: the connector's default, ``tiered``), and
prints the count, the time and, on failure, hypothesis's minimal failing sequence with
its events as ``SchedulerDriver`` calls; exits 1 on failure. Each sequence is at most
``--rules`` rules (default 20) plus a drain at teardown, so 10,000 take minutes here.

    .venv/bin/python experiments/fuzz_scheduler.py [--sequences 10000] [--policy tiered]
        [--profile slow|estimate] [--scheduling priority|fcfs] [--rules 25] [--seed S]
        [--tolerate NAME ...] [--no-shrink]

``--tolerate NAME`` (repeatable; names in ``continuum_tiered.lab.scheduler_fuzz.VIOLATIONS``) ends a
sequence quietly at that invariant's violation and counts it, so that a run with a known
defect keeps looking for others.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis.stateful import get_state_machine_test
from tqdm import tqdm

from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.scheduler_fuzz import (
    REPRO_PRELUDE,
    VIOLATIONS,
    FuzzSetup,
    Variant,
    quiet_logs,
)
from continuum_tiered.policies import DEFAULT_POLICY, POLICIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=10_000)
    parser.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY)
    parser.add_argument(
        "--profile",
        choices=("slow", "estimate"),
        default="slow",
        help="slow: prefill at 0.5 s + 4 ms/token, so cost-model policies pin (default); "
        "estimate: the connector's own roofline estimate of the tiny test model",
    )
    parser.add_argument("--scheduling", choices=("priority", "fcfs"), default="priority")
    parser.add_argument("--rules", type=int, default=20, help="rules per sequence, at most")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--tolerate", action="append", default=[], choices=sorted(VIOLATIONS))
    parser.add_argument("--no-shrink", action="store_true", help="report the first failure as is")
    args = parser.parse_args(argv)
    if args.sequences < 1:
        parser.error("--sequences must be >= 1")

    tolerate = frozenset(args.tolerate)
    variant = Variant(policy=args.policy, profile=args.profile, scheduling=args.scheduling)
    model_dir = write_tiny_llama(Path(tempfile.mkdtemp(prefix="fuzz-tiny-llama-")))
    setup = FuzzSetup.build(model_dir, variant, tolerate)
    run_seed = args.seed if args.seed is not None else int(time.time())
    print(
        f"fuzzing {variant} with {args.sequences} sequences of <= {args.rules} rules, "
        f"seed {run_seed}" + (f", tolerating {sorted(tolerate)}" if tolerate else ""),
        flush=True,
    )

    bar = tqdm(total=args.sequences, unit="seq", smoothing=0.05, mininterval=1.0)
    setup.on_sequence = lambda: bar.update(1)
    phases = [Phase.generate] if args.no_shrink else [Phase.generate, Phase.shrink]
    test = get_state_machine_test(
        setup.machine(),
        settings=settings(
            max_examples=args.sequences,
            stateful_step_count=args.rules,
            deadline=None,
            database=None,
            phases=phases,
            suppress_health_check=list(HealthCheck),
            print_blob=False,
        ),
    )
    test = seed(run_seed)(test)
    start, cpu_start = time.monotonic(), time.process_time()
    failure: BaseException | None = None
    try:
        with quiet_logs():
            test()
    except BaseException as err:  # reported below, then exit 1
        failure = err
    finally:
        bar.close()
    elapsed, cpu = time.monotonic() - start, time.process_time() - cpu_start
    stats = setup.stats
    print(
        f"\n{stats.sequences} sequences in {elapsed:.1f} s, {cpu:.1f} s of CPU "
        f"({60 * stats.sequences / max(elapsed, 1e-9):.0f} sequences/minute)"
    )
    print(stats.summary())
    if failure is None:
        print("no invariant violated")
        return 0
    print(REPRO_PRELUDE.format(variant=variant))
    errors = list(failure.exceptions) if isinstance(failure, BaseExceptionGroup) else [failure]
    print(f"FAILED: {len(errors)} distinct failure(s) (minimal sequences printed above):")
    for err in errors:
        print("-", "".join(traceback.format_exception_only(err)).strip())
    return 1


if __name__ == "__main__":
    sys.exit(main())
