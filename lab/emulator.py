"""The emulator as an engine: one replay on the running fabric.

:func:`replay_under_scenario` runs one scheduler's replay of one window on a
running :class:`fabric.net.Testbed`: the oracle (telemetry from the
controller through :class:`RestTelemetryPoller`, or static), the scenario's
background flows and fault events, the worker processes started in the GPU
hosts' namespaces (:class:`MininetLauncher`), and the emulator's CPU measured
around it (:mod:`lab.envelope`).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

from fabric import cleanup, remote
from fabric.config import TestbedConfig
from fabric.net import Testbed
from fabric.remote import ClockWatch
from fabric.system import run as run_cmd
from fabric.system import stop_child, wait_until
from lab import scenario as scenario_mod
from lab.envelope import EmulatorMeter, RemoteMeter
from lab.faults import FaultRunner
from lab.rundir import NETWORK_FILE, TELEMETRY_SERIES
from netkv.oracle import StaleOracle, StaticOracle, TelemetryOracle
from netkv.repo import REPO_ROOT, child_env
from netkv.serving.config import ReplayConfig
from netkv.stats import percentile
from netkv.telemetry import TelemetrySnapshot
from workers.driver import ReplayError
from workers.run import replay


def metered_replay(tb: Any, cfg: Any, launcher: Any, run_dir: Path, *,
                   oracle: Any = None, on_start: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay (workers.run.replay) with the emulator's CPU measured
    around it; the envelope is judged over the replay clock's window (the
    workers' start-up is not part of it).  ``on_start``: called with the
    frontend once the replay clock starts (the fault runner).  Returns
    (summary, envelope).

    Across servers, each other server's switch processes are metered there
    by the same rule (:class:`lab.envelope.RemoteMeter`), over the same window
    on that server's clock; the replay is inside the envelope only when every
    server is (``servers`` in the envelope holds each one's)."""
    meter = EmulatorMeter(tb.switch_processes(), pids_source=tb.switch_processes)
    meter.start()
    remote_meters = start_remote_meters(tb)
    summary: dict[str, Any] = {}
    try:
        summary = replay(cfg, launcher, run_dir, oracle=oracle, topology=tb.topo, status_url=tb.rest_url + "/replay",
                         on_start=on_start)
    finally:
        start = summary.get("run_start_epoch_s")
        window = (float(start), time.time()) if start else None
        lag = summary.get("max_dispatch_lag_ms")
        envelope = meter.stop(window, dispatch_lag_ms=lag)
        if remote_meters:
            offsets = {name: info["offset_s"] for name, info in
                       ((summary.get("clocks") or {}).get("servers") or {}).items()}
            envelope["servers"] = {}
            for name, rm in remote_meters.items():
                off = offsets.get(name)
                there = None if window is None or off is None else (window[0] + off, window[1] + off)
                envelope["servers"][name] = {**rm.stop(there, lag), "clock_offset_s": off}
            judge_servers(envelope)
    return summary, envelope


def start_remote_meters(tb: Any) -> dict[str, RemoteMeter]:
    """A meter on every other server over the switch processes living there."""
    meters: dict[str, RemoteMeter] = {}
    for server in tb.sites.workers:
        pids = {n: pid for n, pid in tb.switch_pids.items() if tb.sites.server_of(n) == server}
        argv = [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "lab.envelope", "--pids", json.dumps(pids)]
        meters[server.name] = RemoteMeter(server.name, tb.sites.on_server(server, argv))
    return meters


def judge_servers(envelope: dict[str, Any]) -> None:
    """The replay's verdict over every server: inside only when the head and
    each other server are; the first one outside names the resource."""
    if not envelope.get("within_envelope", False):
        return  # the head's own verdict stands, with its resource
    for name, env in sorted(envelope.get("servers", {}).items()):
        if "error" in env:
            envelope["within_envelope"] = False
            envelope["limiting_resource"] = f"server {name}: not measured ({env['error']})"
            return
        if not env.get("within_envelope", False):
            envelope["within_envelope"] = False
            envelope["limiting_resource"] = f"server {name}: {env.get('limiting_resource')}"
            return


# -- the launcher and the telemetry source the replay uses ------------------------------------
class MininetLauncher:
    """workers.launch.Launcher over a running Testbed: each worker runs inside
    its GPU host's namespaces, listens on the host's emulated address, and its
    pid is recorded for the testbed's sweep.

    On a testbed across servers a worker of a GPU host on another server runs
    there (:meth:`fabric.net.Testbed.popen`); it reaches the frontend's control
    socket through an ssh forward to that server (:meth:`control_path`); its
    reports carry that server's clock and are put on the head's
    (:meth:`to_head_s`, :class:`fabric.remote.ClockWatch`, started by
    :meth:`prepare`, which refuses a replay whose offsets are not known well
    enough); :meth:`finish` ends the forwards and returns what ``run.json``
    keeps of the clocks."""

    def __init__(self, testbed: Any) -> None:
        self.tb = testbed
        self.clocks: ClockWatch | None = None
        self.forwards: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}  # server -> (ssh -R, socket there)

    def data_addr(self, host: str) -> tuple[str, int]:
        return self.tb.data_addr(host)  # type: ignore[no-any-return]

    def netns_path(self, host: str) -> str | None:
        """The GPU host's network namespace, where a tensor-parallel worker on
        another rank host of its instance opens this rank's sockets (on the
        host's own server: an instance never spans servers)."""
        return f"/proc/{self.tb.host_pid(host)}/ns/net"

    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen:  # type: ignore[type-arg]
        with open(log_path, "ab") as log:
            return self.tb.popen(host, argv, kind="worker", marker="workers.", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                 env=child_env())  # type: ignore[no-any-return]

    # -- across servers -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Before any worker starts: every other server's clock offset,
        ClusterError (one line) when one is not known to the testbed's
        ``clock_bound_ms``."""
        sites = self.tb.sites
        if sites.cluster and self.clocks is None:
            clocks = ClockWatch(sites.workers, sites.on_server, bound_s=self.tb.config.clock_bound_ms / 1000)
            clocks.start()
            self.clocks = clocks

    def control_path(self, host: str, local: str) -> str:
        """Where the worker of ``host`` connects to the frontend: ``local`` on
        this machine, else the end of an ssh forward to it on the host's server."""
        server = self.tb.sites.server_of(host)
        if server is None:
            return local
        if server.name not in self.forwards:
            self.forwards[server.name] = self._forward(server, Path(local))
        return str(self.forwards[server.name][1])

    def _forward(self, server: Any, local: Path) -> tuple[subprocess.Popen[bytes], Path]:
        tb = self.tb
        there = remote.worker_control_socket(tb.run_dir, f"{os.getpid()}-{len(self.forwards)}-{int(time.time())}")
        run_cmd(tb.sites.on_server(server, ["mkdir", "-p", str(there.parent)]))
        log = open(tb.run_dir / f"forward-{server.name}.log", "ab")
        proc = subprocess.Popen(remote.forward_argv(server, there, local), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        cleanup.record_pid(tb.prefix, proc.pid, str(there), "forward")

        def listening() -> bool:
            return proc.poll() is not None or run_cmd(tb.sites.on_server(server, ["test", "-S", str(there)]),
                                                      check=False).returncode == 0

        wait_until(listening, timeout_s=30, interval_s=0.2)
        if proc.poll() is not None or not listening():
            proc.kill()
            raise ReplayError(f"the control socket could not be forwarded to {server.label} "
                              f"(log: {tb.run_dir / f'forward-{server.name}.log'})")
        return proc, there

    def to_head_s(self, host: str, t_s: float) -> float:
        """A time stamp of the worker of ``host`` on the head's clock."""
        server = self.tb.sites.server_of(host)
        if server is None or self.clocks is None:
            return t_s
        return self.clocks.to_head_s(server.name, t_s)

    def finish(self) -> dict[str, Any]:
        """After the workers have stopped: the forwards ended and their sockets
        removed; the clocks' record for ``run.json`` (``{}`` on one machine)."""
        for name, (proc, there) in self.forwards.items():
            stop_child(proc, grace_s=5)
            server = next(s for s in self.tb.sites.workers if s.name == name)
            run_cmd(self.tb.sites.on_server(server, ["rm", "-f", str(there)]), check=False)
        self.forwards.clear()
        if self.clocks is None:
            return {}
        clocks, self.clocks = self.clocks.stop(), None
        return {"clocks": clocks}


class RestTelemetryPoller:
    """A netkv.telemetry.TelemetrySource fed by the controller's ``/links``.

    A thread fetches the table once per polling interval and the source
    returns the latest copy, so a scheduler's decision never waits for HTTP.
    Each sample keeps the time the switch was measured, so the oracle sees its
    true age (and falls back to the static estimate when it is too old).
    ``on_update``, if set, is called with each new snapshot before the source
    hands it out (the oracle's ``prepare``): in the polling thread until
    :meth:`deliver_in` names the replay's event loop, then in that loop's
    thread, between two of its callbacks.  So the refresh runs in the thread
    that decides, never inside a decision and never holding the interpreter
    lock while a decision waits for it (in the polling thread it did: a
    decision of 0.2 ms of CPU could take 5 ms, the interpreter's switch
    interval).  Its duration is kept (``telemetry_refresh_ms_*``)."""

    def __init__(self, testbed: Any, interval_s: float, series_path: Path | None = None) -> None:
        self.tb = testbed
        self.interval_s = interval_s
        # Every fetched table is also appended here, one line per poll
        # (``{"t_s", "links": [[src, dst, utilization, load_gbps, drops], ...]}``),
        # so that a report can draw link utilisation over time.
        self._series = series_path.open("a") if series_path is not None else None
        self.latest = TelemetrySnapshot()
        self.on_update: Callable[[Any], None] | None = None
        self.fetches = 0
        self.refresh_ms: list[float] = []  # on_update's duration, per snapshot handed over in the loop
        self._loop: Any = None  # see deliver_in
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="telemetry", daemon=True)

    def __call__(self) -> Any:
        return self.latest

    def start(self) -> "RestTelemetryPoller":
        self._fetch()
        self._thread.start()
        return self

    def _fetch(self) -> None:
        body = self.tb.rest_get("/links", timeout_s=max(1.0, self.interval_s))
        if body is None:
            self.failures += 1
            return
        try:
            snap = TelemetrySnapshot.from_json(body)
        except ValueError:
            self.failures += 1
            return
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._publish, snap, True)
            except RuntimeError:  # the loop has closed: the replay is over
                self._loop = None
                self._publish(snap)
        else:
            self._publish(snap)
        self.fetches += 1
        if self._series is not None:
            rows = [[x.src, x.dst, round(x.utilization, 4), round(x.load_gbps, 3), x.drops]
                    for x in snap.samples.values()]
            self._series.write(json.dumps({"t_s": round(time.time(), 3), "links": rows}) + "\n")
            self._series.flush()

    def _publish(self, snap: Any, in_loop: bool = False) -> None:
        if self.on_update is not None:
            began = time.perf_counter()
            self.on_update(snap)
            if in_loop:  # the ones that can hold up a decision
                self.refresh_ms.append((time.perf_counter() - began) * 1e3)
        self.latest = snap

    def deliver_in(self, loop: Any) -> None:
        """Hand new snapshots over in ``loop``'s thread from now on (an asyncio
        loop: the replay's frontend, which makes every decision there)."""
        self._loop = loop

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._fetch()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=5)
        if self._series is not None:
            self._series.close()
        def pct(q: float) -> float | None:
            value = percentile(self.refresh_ms, q)
            return None if value is None else round(value, 3)

        return {"telemetry_fetches": self.fetches, "telemetry_fetch_failures": self.failures,
                "telemetry_refreshes": len(self.refresh_ms), "telemetry_refresh_ms_p50": pct(50),
                "telemetry_refresh_ms_p99": pct(99), "telemetry_refresh_ms_max": pct(100)}


def network_counters(tb: Any) -> dict[str, Any]:
    """What the fabric counted so far: every GPU host's TCP segments sent and
    retransmitted (its namespace's /proc/<pid>/net/snmp, read from outside,
    on the host's own server),
    and every directed link's egress-queue drops (the controller's /links,
    the htb qdisc's counter; None when the controller does not answer)."""
    tcp: dict[str, tuple[int, int]] = {}
    texts: dict[str, str] = {}
    on_server: dict[Any, list[str]] = {}
    for host in tb.topo.gpu_names():
        on_server.setdefault(tb.sites.server_of(host), []).append(host)
    for server, hosts in on_server.items():
        try:
            files = {f"/proc/{tb.host_pid(h)}/net/snmp": h for h in hosts}
        except (ValueError, AttributeError, KeyError):
            continue
        if server is None:
            for path, host in files.items():
                try:
                    texts[host] = Path(path).read_text()
                except OSError:
                    pass
        else:  # another server's hosts: their files read there, in one command
            out = run_cmd(tb.sites.on_server(server, ["head", "-v", "-n", "1000", *files]), check=False).stdout
            for part in out.split("==> ")[1:]:
                name, _, body = part.partition(" <==\n")
                if name in files:
                    texts[files[name]] = body
    for host, text in texts.items():
        rows = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
        if len(rows) == 2:
            fields = dict(zip(rows[0][1:], rows[1][1:]))
            tcp[host] = (int(fields.get("OutSegs", 0)), int(fields.get("RetransSegs", 0)))
    links = tb.rest_get("/links")
    drops = None if not isinstance(links, dict) else {
        f"{r['src']}->{r['dst']}": int((r.get("queue") or {}).get("drops_total") or 0) for r in links.get("links", [])}
    return {"tcp": tcp, "queue_drops": drops}


def network_delta(tb: Any, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """network.json of a replay: TCP segments retransmitted out of those sent,
    and packets the links' egress queues dropped, over the replay (KV
    transfers and background flows alike), by tier for the drops.  A counter
    that went down (a restarted controller's or qdisc's) counts from zero."""
    sent = retrans = 0
    for host, (out_after, re_after) in after["tcp"].items():
        out_before, re_before = before["tcp"].get(host, (0, 0))
        sent += out_after - out_before if out_after >= out_before else out_after
        retrans += re_after - re_before if re_after >= re_before else re_after
    out: dict[str, Any] = {"tcp_segments_sent": sent, "tcp_segments_retransmitted": retrans,
                           "tcp_retransmit_rate": round(retrans / sent, 6) if sent else None}
    if before["queue_drops"] is None or after["queue_drops"] is None:
        out["queue_drops"] = None
        return out
    by_tier: dict[str, int] = {}
    total = 0
    for hop, n_after in after["queue_drops"].items():
        n_before = before["queue_drops"].get(hop, 0)
        n = n_after - n_before if n_after >= n_before else n_after
        if n:
            src, dst = hop.split("->")
            tier = str(tb.topo.link_between(src, dst).tier)
            by_tier[tier] = by_tier.get(tier, 0) + n
            total += n
    out.update(queue_drops=total, queue_drops_by_tier=dict(sorted(by_tier.items())))
    return out


def replay_under_scenario(tb: Any, cfg: Any, scen: scenario_mod.Scenario, run_dir: Path, *,
                          datapath: str = "", on_start: Callable[[Any], None] | None = None
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One replay on the running fabric: the oracle (telemetry from the
    controller, or static), the scenario's background flows and its fault
    events, the emulator's CPU measured around it.  ``on_start``: also called
    with the frontend when the replay clock starts.  Writes envelope.json (with
    the telemetry poller's counts and the fault runner's records) and returns
    (summary, envelope)."""
    poller = None
    if cfg.oracle == "telemetry":
        poller = RestTelemetryPoller(tb, tb.config.poll_interval_s, series_path=run_dir / TELEMETRY_SERIES)
        oracle: Any = (StaleOracle(tb.topo, poller, cfg.telemetry_delay_ms) if cfg.telemetry_delay_ms
                       else TelemetryOracle(tb.topo, poller))
        poller.on_update = oracle.prepare  # hop figures and tables computed in the polling thread
        poller.start()
    else:
        oracle = StaticOracle(tb.topo)
    runner = scenario_mod.ScenarioRunner(tb, scen, run_dir / "background")
    faults = FaultRunner(tb, scen.events, run_dir, oracle=oracle, telemetry=poller) if scen.events else None
    runner.start()
    polled: dict[str, Any] = {}
    fault_records: list[dict[str, Any]] = []
    def started(frontend: Any) -> None:
        if poller is not None and frontend.loop is not None:
            poller.deliver_in(frontend.loop)
        if on_start is not None:
            on_start(frontend)
        if faults is not None:
            faults.attach(frontend)

    try:
        counters_before = network_counters(tb)
        summary, envelope = metered_replay(tb, cfg, MininetLauncher(tb), run_dir, oracle=oracle, on_start=started)
    finally:
        if faults is not None:
            fault_records = faults.stop()
        runner.stop()
        if poller is not None:
            polled = poller.stop()
    envelope.update(polled)
    try:  # the network's counters are a figure of the replay, never the reason it loses its verdict
        network = network_delta(tb, counters_before, network_counters(tb))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        network = {"error": f"{type(exc).__name__}: {exc}"}
    (run_dir / NETWORK_FILE).write_text(json.dumps(network, indent=2) + "\n")
    envelope["background_flows_started"] = runner.started_flows
    envelope["datapath"] = datapath or tb.report.datapath
    if faults is not None:
        envelope["fault_events"] = fault_records
    (run_dir / "envelope.json").write_text(json.dumps(envelope, indent=2) + "\n")
    return summary, envelope


class EmulatorEngine:
    """The emulated fabric as an experiment's engine (:mod:`lab.engine`)."""

    def __init__(self, config: TestbedConfig, jobs: int = 1) -> None:
        if jobs != 1:
            raise ValueError("the emulated fabric runs one replay at a time (jobs=1)")
        self.config = config
        self.tb = Testbed(config)
        self.topology = self.tb.topo
        self.datapath = ""

    def up(self) -> dict[str, Any]:
        report = self.tb.up()
        self.datapath = report.datapath
        return {"config": self.config.to_json(), "bringup": report.as_dict()}

    def describe(self) -> list[str]:
        report = self.tb.report
        return [f"fabric up in {report.up_s:.1f} s ({report.datapath} datapath, "
                f"{report.pings_ok}/{report.pings_total} pairs reachable)",
                f"live fabric view {self.tb.rest_url}/ (the replay shows there while it runs)"]

    def replay(self, cfg: ReplayConfig, scen: scenario_mod.Scenario,
               run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        return replay_under_scenario(self.tb, cfg, scen, run_dir, datapath=self.datapath)

    def down(self) -> None:
        self.tb.down()
