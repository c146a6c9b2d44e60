"""What runs an experiment's replays: an engine.

``netkv run`` hands every (window, scheduler) replay to one engine, brought up
once per experiment.  An engine moves the KV bytes and plays the instances; the
serving model above it (:mod:`netkv.serving`: the router's ledger, the
prefill and decode instances, the records) is the same for every engine.

* ``emulate`` (:class:`lab.emulator.EmulatorEngine`): the emulated fabric
  (:mod:`fabric`), worker processes moving real bytes over TCP
  (:mod:`workers`), the emulator's envelope judged per replay.
* ``simulate`` (:class:`lab.simulator.SimulatorEngine`): SimGrid's flow-level
  network (:mod:`sim`) at real rates on a simulated clock, the serving model
  driven in process; no envelope (``lab.verdict`` judges its replays inside).

An engine is made as ``ENGINES[name](config, jobs)``: ``jobs`` replays at once
(at most :data:`MAX_JOBS` of the engine).  A new engine implements
:class:`Engine` in a module of its own under ``lab/``
(its network model in a package beside ``fabric/``) and is named in
:data:`ENGINES`; every replay it runs must leave the same files in its run
directory (config.json, records.jsonl, summary.json, envelope.json with a
verdict), so that ``netkv report``, campaigns and sweeps read it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from fabric.config import TestbedConfig
from lab.emulator import EmulatorEngine
from lab.scenario import Scenario
from lab.simulator import SimulatorEngine
from netkv.serving.config import ReplayConfig
from topologies import Topology


class Engine(Protocol):
    topology: Topology

    def up(self) -> dict[str, Any]:
        """Bring it up; returns what the run directory's ``testbed.json`` records
        (``config``, ``bringup``)."""

    def describe(self) -> list[str]:
        """Lines for the user once it is up (where to watch, what it holds)."""

    def replay(self, cfg: ReplayConfig, scen: Scenario, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """One scheduler's replay of one window under the scenario: (summary,
        envelope), both also written to ``run_dir``.  An engine built with
        ``jobs`` > 1 is called from that many threads at once."""

    def down(self) -> None:
        """Remove everything it made (safe to call twice)."""


ENGINES: dict[str, Callable[[TestbedConfig, int], Engine]] = {"emulate": EmulatorEngine,
                                                               "simulate": SimulatorEngine}
DEFAULT_ENGINE = "emulate"
# replays an engine can run at once (``jobs``; None: no bound but the memory): the emulated
# fabric is one machine's, so one; the simulator's replays are independent processes
MAX_JOBS: dict[str, int | None] = {"emulate": 1, "simulate": None}


def check_jobs(engine: str, jobs: int) -> None:
    """ValueError (one line) for a number of replays at once the engine cannot run."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    bound = MAX_JOBS.get(engine)
    if bound is not None and jobs > bound:
        raise ValueError(f"--jobs {jobs}: the {engine} engine runs {bound} replay at a time "
                         f"(the emulated fabric is shared by every replay); --jobs is for the simulator")
