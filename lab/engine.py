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

A new engine implements :class:`Engine` in a module of its own under ``lab/``
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
        envelope), both also written to ``run_dir``."""

    def down(self) -> None:
        """Remove everything it made (safe to call twice)."""


ENGINES: dict[str, Callable[[TestbedConfig], Engine]] = {"emulate": EmulatorEngine,
                                                          "simulate": SimulatorEngine}
DEFAULT_ENGINE = "emulate"
