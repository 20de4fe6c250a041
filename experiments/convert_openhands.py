"""Convert an OpenHands evaluation run's raw logs into the compact OpenHands trace file.

    python experiments/convert_openhands.py RUN_DIR [--out FILE] [--source TEXT]
        [--utc-offset-hours H]

RUN_DIR holds ``llm_completions/<instance>/*.json``, ``infer_logs/instance_<instance>.log``
and ``metadata.json`` of one run (the embedded file's run: see
``continuum_tiered/data/README.md`` for where it is and how to fetch it). The rules are
:mod:`continuum_tiered.traces.openhands`'s; the default output is the embedded file.
Instances are written in name order; one that cannot be converted stops the conversion
with the file and field at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from continuum_tiered.traces.build import data_path
from continuum_tiered.traces.model import TraceError
from continuum_tiered.traces.openhands import (
    EMBEDDED_PROGRAMS,
    read_completion,
    recorded_calls,
    step_times,
)


def convert(run: Path, source: str, utc_offset_s: float | None) -> list[dict[str, object]]:
    """One compact record per instance of ``run``."""
    completions_dir = run / "llm_completions"
    instances = sorted(p for p in completions_dir.iterdir() if p.is_dir())
    if not instances:
        raise TraceError(f"{completions_dir}: no instance folders")
    records = []
    for folder in instances:
        completions = []
        for file in sorted(folder.glob("*.json")):
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError) as err:
                raise TraceError(f"{file}: not a readable JSON file ({err})") from err
            completions.append(read_completion(data, str(file)))
        log = run / "infer_logs" / f"instance_{folder.name}.log"
        try:
            with log.open(errors="replace") as f:
                steps = step_times(f)
        except OSError as err:
            raise TraceError(f"{log}: not readable ({err})") from err
        calls = recorded_calls(completions, steps, str(folder), utc_offset_s)
        records.append(
            {
                "program_id": folder.name,
                "source": source,
                "calls": [c.to_json() for c in calls],
            }
        )
    return records


def default_source(run: Path) -> str:
    """``OpenHands <agent> / <model> / <dataset>`` from the run's metadata.json."""
    meta = json.loads((run / "metadata.json").read_text())
    model = str(meta["llm_config"]["model"]).rsplit("/", 1)[-1]
    return f"OpenHands {meta['agent_class']} / {model} / {meta['dataset']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (llm_completions/, infer_logs/)")
    parser.add_argument("--out", type=Path, default=data_path(EMBEDDED_PROGRAMS))
    parser.add_argument("--source", help="the records' source (default: from metadata.json)")
    parser.add_argument(
        "--utc-offset-hours",
        type=float,
        help="hours to add to the logs' local clock to get UTC (default: inferred per instance)",
    )
    args = parser.parse_args(argv)
    offset = None if args.utc_offset_hours is None else args.utc_offset_hours * 3600
    try:
        records = convert(args.run, args.source or default_source(args.run), offset)
    except TraceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    with args.out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    calls = sum(len(r["calls"]) for r in records)  # type: ignore[arg-type]
    print(f"wrote {len(records)} programs, {calls} calls to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
