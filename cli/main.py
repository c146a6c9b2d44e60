"""``netkv``: the testbed's one command.

Every subcommand explains its options with ``--help``.  Bad input ends with
one line on stderr and a non-zero exit status, never a traceback; a failed
bring-up removes what it built before it exits.  The subcommands live in one
module per group: :mod:`cli.fabric` (the emulated network),
:mod:`cli.lab` (experiments), and ``netkv telemetry`` in
:mod:`controller.top`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from controller import top
from fabric.cluster import ClusterError
from fabric.config import ConfigError
from fabric.net import BringUpError
from fabric.system import PreflightError
from lab.experiment import ExperimentError
from lab.scenario import ScenarioError
from lab.simulator import SimulatorRefusal
from netkv.placement import PlacementError
from netkv.schedulers import SchedulerLoadError
from netkv.serving.config import ReplayConfigError
from netkv.serving.ledger import LedgerError
from netkv.traces import TraceError
from topologies import TopologyError
from workers.driver import ReplayError

from . import fabric, lab
from .common import EXIT_FAIL, EXIT_USAGE, CliError

# Exception classes that mean "bad input": one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CliError, ConfigError, ClusterError, TopologyError, PreflightError, ScenarioError, ExperimentError, ReplayConfigError,
    TraceError, PlacementError, SchedulerLoadError, SimulatorRefusal)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="netkv",
        description="NetKV testbed: an emulated GPU fabric (Mininet + Open vSwitch + an os-ken "
                    "controller) that replays LLM-serving traces and moves real KV bytes over TCP "
                    "to compare decode-instance schedulers.",
        epilog="Most commands need root. Start with `netkv topo`, then `sudo netkv up --check`.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every command the testbed runs")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fabric.add_parsers(sub)
    top.add_parser(sub)
    lab.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="netkv: %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"netkv: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("netkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (netkv ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except (BringUpError, LedgerError, ReplayError) as exc:  # a failed bring-up; a scheduler that broke its
        # contract; a replay that could not run (workers that did not start)
        print(f"netkv: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except Exception as exc:  # noqa: BLE001 - one line for the user, details in a file
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"netkv-error-{os.getpid()}.log"
        try:
            log.write_text(traceback.format_exc())
            where = f" (details: {log})"
        except OSError:
            where = ""
        print(f"netkv: error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
