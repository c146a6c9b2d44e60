"""Replay a trace window through real worker processes: the entry point.

``replay(config, launcher, run_dir) -> summary`` is what the testbed CLI
calls (with its Mininet launcher); ``python -m workers.run --config C.json
--run-dir D`` runs the same thing on this machine with :class:`LocalLauncher`.

A run directory holds afterwards:

* ``config.json``: the :class:`ReplayConfig` (every field), enough to repeat the run;
* ``run.json``: what the config resolved to (placement, perf-model figures,
  worker pids and data addresses, the time origin);
* ``records.jsonl``: one record per replayed request (:mod:`netkv.records`);
* ``summary.json``: metrics read back from ``records.jsonl`` plus run facts;
* ``trace_skipped.txt``: malformed trace lines left out (``on_trace_error="skip"``);
* ``logs/<host>.log``: each worker's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from netkv.serving.config import ReplayConfig, ReplayConfigError

from .driver import Frontend
from .launch import Launcher, LocalLauncher


def replay(
    config: ReplayConfig,
    launcher: Launcher,
    run_dir: str | Path,
    *,
    oracle: Any = None,
    scheduler: Any = None,
    topology: Any = None,
    status_url: str | None = None,
    on_start: Any = None,
) -> dict[str, Any]:
    """Run one replay and return its summary (also written to ``summary.json``).

    ``oracle``: required when ``config.oracle == "telemetry"`` (the testbed
    passes a :class:`netkv.oracle.TelemetryOracle` fed by its controller);
    otherwise a :class:`netkv.oracle.StaticOracle` of the topology is used.
    ``scheduler`` replaces ``netkv.schedulers.create(config.scheduler, ...)``
    (tests, custom policies).  ``topology`` replaces building
    ``config.topology`` from the catalog (it must be the same fabric the
    launcher emulates).  ``status_url``: the controller's ``/replay``, where
    progress is POSTed every half second for the fabric view.  ``on_start``:
    called with the frontend, in its event loop, once the replay clock starts
    (``frontend.t0``; the testbed's fault runner schedules its events then)."""
    return Frontend(config, launcher, Path(run_dir), oracle=oracle, scheduler=scheduler, topology=topology,
                    status_url=status_url, on_start=on_start).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.run",
        description="Replay a trace through NetKV workers on this machine (127.0.0.1).",
        epilog="Config keys:\n" + ReplayConfig.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="JSON file with ReplayConfig keys (others keep their defaults)")
    parser.add_argument("--run-dir", required=True, help="directory for config.json, records.jsonl, logs")
    args = parser.parse_args(argv)
    try:
        config = ReplayConfig.load(args.config) if args.config else ReplayConfig()
    except ReplayConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = replay(config, LocalLauncher(), args.run_dir)
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("problems") == [] else 1


if __name__ == "__main__":
    sys.exit(main())
