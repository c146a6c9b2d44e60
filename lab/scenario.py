"""Scripted congestion: background flows that load chosen paths during a run.

A scenario is a JSON file (``scenarios/*.json``)::

    {"name": "core-hotspot",
     "description": "what it stands for",
     "flows": [{"src": "g2", "dst": "g34", "start_s": 0, "duration_s": 600,
                "rate_gbps": 160, "protocol": "tcp"}]}

Rates are real-world Gbit/s, divided by the testbed's scale factor like every
link rate.  Each flow is one iperf3 client in the source host's namespace,
paced at the emulated rate, towards an iperf3 server of its own in the
destination host (one port per flow).  TCP flows back off like the other
tenants' traffic of a real fabric would; UDP flows hold their rate whatever
happens.  Times are seconds from the start of the replay.

A scenario may also list ``events``: faults at scheduled times of the replay
(links re-rated, down and up, workers killed, the controller or a switch
restarted); see :mod:`lab.faults`.

Parsing and validation are plain logic (no root); :class:`ScenarioRunner`
starts and ends the processes through a :class:`~fabric.net.Testbed`.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fabric.config import emulated_mbps
from lab.faults import Event, FaultError, parse_events
from netkv.checks import number_complaint
from netkv.repo import REPO_ROOT
from topologies import Topology

SCENARIO_DIR = REPO_ROOT / "scenarios"
FLOW_KEYS = {"src", "dst", "start_s", "duration_s", "rate_gbps", "protocol"}
SCENARIO_KEYS = {"name", "description", "flows", "events", "topology_params"}
BASE_PORT = 5301
MAX_FLOWS = 64


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the flow and the field."""


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    start_s: float
    duration_s: float
    rate_gbps: float
    protocol: str = "tcp"


@dataclass
class Scenario:
    name: str
    description: str = ""
    flows: list[Flow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "description": self.description,
                               "flows": [asdict(f) for f in self.flows]}
        if self.events:
            out["events"] = [e.to_json() for e in self.events]
        return out

    def load_mbps_hops(self, topo: Topology, scale: float) -> float:
        """Emulated Mbit/s x shaped links the flows put on the switch process
        when all run at once (what the envelope check compares)."""
        return sum(emulated_mbps(f.rate_gbps, scale) * len(topo.path_hops(f.src, f.dst))
                   for f in self.flows)


def _number(flow: Mapping[str, Any], key: str, where: str, minimum: float, default: float | None = None) -> float:
    value = flow.get(key, default)
    complaint = number_complaint(value, key, minimum)
    if complaint is not None:
        raise ScenarioError(f"{where}: {complaint}")
    return float(value)  # type: ignore[arg-type]


def parse(data: Any, topo: Topology, origin: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{origin}: expected a JSON object with keys {sorted(SCENARIO_KEYS)}")
    unknown = sorted(set(data) - SCENARIO_KEYS)
    if unknown:
        raise ScenarioError(f"{origin}: unknown key {unknown[0]!r}; known: {', '.join(sorted(SCENARIO_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError(f"{origin}: 'name' must be a non-empty string")
    flows_raw = data.get("flows", [])
    if not isinstance(flows_raw, list) or len(flows_raw) > MAX_FLOWS:
        raise ScenarioError(f"{origin}: 'flows' must be a list of at most {MAX_FLOWS} flows")
    flows = []
    gpus = set(topo.gpu_names())
    for i, raw in enumerate(flows_raw):
        where = f"{origin}: flow {i}"
        if not isinstance(raw, dict):
            raise ScenarioError(f"{where}: expected an object")
        bad = sorted(set(raw) - FLOW_KEYS)
        if bad:
            raise ScenarioError(f"{where}: unknown key {bad[0]!r}; known: {', '.join(sorted(FLOW_KEYS))}")
        src, dst = raw.get("src"), raw.get("dst")
        for key, host in (("src", src), ("dst", dst)):
            if not isinstance(host, str) or host not in gpus:
                raise ScenarioError(f"{where}: {key} {host!r} is not a GPU host of {topo.name} "
                                    f"(g0..g{len(gpus) - 1})")
        if src == dst:
            raise ScenarioError(f"{where}: src and dst are the same host")
        protocol = raw.get("protocol", "tcp")
        if not isinstance(protocol, str) or protocol not in ("tcp", "udp"):
            raise ScenarioError(f"{where}: protocol must be tcp or udp, got {protocol!r}")
        rate = _number(raw, "rate_gbps", where, 1e-6)
        bottleneck = topo.bottleneck_gbps(str(src), str(dst))
        if rate > bottleneck:
            raise ScenarioError(f"{where}: rate_gbps {rate:g} exceeds the path's bottleneck {bottleneck:g}")
        flows.append(Flow(str(src), str(dst), _number(raw, "start_s", where, 0, 0.0),
                          _number(raw, "duration_s", where, 1.0), rate, str(protocol)))
    try:
        events = parse_events(data.get("events", []), topo, origin)
    except FaultError as exc:
        raise ScenarioError(str(exc)) from None
    return Scenario(name, str(data.get("description", "")), flows, events)


def load(name_or_path: str, topo: Topology) -> Scenario:
    """A scenario by name (``scenarios/<name>.json``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.json")))
        raise ScenarioError(f"no scenario {name_or_path!r} (known: {known}; or give a path)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"cannot read scenario {path}: not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise ScenarioError(f"cannot read scenario {path}: JSON nested too deeply") from None
    return parse(data, topo, str(path))


def names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))


def written_for(name: str) -> dict[str, Any]:
    """The topology parameters a shipped scenario is written for (its
    ``topology_params``, {} for the default fabric): its flows are sized for
    those links.  Documentation and a check of the file; an experiment
    applies a scenario to whatever fabric it runs, and a flow that does not
    fit its path there is refused."""
    try:
        data = json.loads((SCENARIO_DIR / f"{name}.json").read_text())
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot read scenario {name}: {exc}") from None
    params = data.get("topology_params", {}) if isinstance(data, dict) else {}
    if not isinstance(params, dict):
        raise ScenarioError(f"scenario {name}: 'topology_params' must be a JSON object, got {params!r}")
    return params


class ScenarioRunner:
    """Starts each flow's iperf3 server at once and its client at ``start_s``.

    Every process is started through the testbed (so its pid is recorded for
    the sweep) and ended by pid in :meth:`stop`."""

    def __init__(self, testbed: Any, scenario: Scenario, log_dir: Path) -> None:
        self.tb = testbed
        self.scenario = scenario
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.timers: list[threading.Timer] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.started_flows = 0

    def _client_argv(self, flow: Flow, port: int) -> list[str]:
        mbps = emulated_mbps(flow.rate_gbps, self.tb.config.scale)
        argv = ["iperf3", "-c", self.tb.topo.ip_of(flow.dst), "-p", str(port),
                "-t", f"{flow.duration_s:g}", "-b", f"{mbps * 1e6:.0f}", "--connect-timeout", "3000"]
        if flow.protocol == "udp":
            argv += ["-u", "-l", str(self.tb.config.mtu_bytes - 28)]
        return argv

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, flow in enumerate(self.scenario.flows):
            port = BASE_PORT + i
            log = open(self.log_dir / f"flow{i}-server.log", "wb")
            server = self.tb.popen(flow.dst, ["iperf3", "-s", "-p", str(port), "-B", self.tb.topo.ip_of(flow.dst)],
                                   kind="iperf3", marker="iperf3", stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
            log.close()
            self.procs.append(server)
        time.sleep(0.3 if self.scenario.flows else 0)
        for i, flow in enumerate(self.scenario.flows):
            timer = threading.Timer(flow.start_s, self._start_client, args=(i, flow))
            timer.daemon = True
            self.timers.append(timer)
            timer.start()

    def _start_client(self, i: int, flow: Flow) -> None:
        with self._lock:
            if self._stopped:
                return
            log = open(self.log_dir / f"flow{i}-client.log", "wb")
            proc = self.tb.popen(flow.src, self._client_argv(flow, BASE_PORT + i), kind="iperf3",
                                 marker="iperf3", stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
            log.close()
            self.procs.append(proc)
            self.started_flows += 1

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        for timer in self.timers:
            timer.cancel()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
