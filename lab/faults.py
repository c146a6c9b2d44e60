"""Faults as scenario events: links, workers, the controller and switches
fail mid-replay on schedule, and each is recorded.

A scenario's ``events`` list (beside its ``flows``; :mod:`lab.scenario`)::

    {"kind": "link_down", "t_s": 10, "link": ["a0", "c0"]}
    {"kind": "link_up", "t_s": 20, "link": ["a0", "c0"]}
    {"kind": "link_rate", "t_s": 5, "link": ["t0", "a0"], "rate_gbps": 100}
    {"kind": "worker_kill", "t_s": 15, "host": "g40", "restart_after_s": 5}
    {"kind": "controller_restart", "t_s": 25, "down_s": 3}
    {"kind": "switch_restart", "t_s": 30, "switch": "a1", "down_s": 2}

``t_s`` is seconds on the replay clock (0 = the replay's first possible
arrival, once every worker is up).  A link is named by its two ends, in either
order.  ``link_rate`` re-rates the htb class of both ends (real Gbit/s, divided
by the scale factor like every rate); ``link_down``/``link_up`` set both ends'
interfaces down or up; ``worker_kill`` sends SIGKILL to the worker of a GPU
host (prefill or decode) and, with ``restart_after_s``, starts it again that
many seconds later; ``controller_restart`` kills the controller by its pid and
starts it again after ``down_s``; ``switch_restart`` does the same to one
switch's ``ovs-vswitchd`` and ``ovsdb-server`` (one process per switch) or,
with the shared Open vSwitch, deletes its bridge and adds it again.

Every event is written to ``events.jsonl`` in the replay directory: the
requested time, the actual time, what was measured (detection, reroute,
recovery) and the outcome.  At the end of a replay the fabric is restored
(links up at their nominal rate, controller and switches running), so the next
scheduler meets the same fabric; the restorations are recorded too.

Parsing and validation are plain logic (no root); :class:`FaultRunner` acts
through a :class:`fabric.net.Testbed` and the replay's frontend.
"""

from __future__ import annotations

import heapq
import json
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

from fabric import faults as fabric_faults
from fabric.config import emulated_mbps
from netkv.checks import number_complaint
from topologies import Topology

EVENT_FIELDS: dict[str, frozenset[str]] = {
    "link_rate": frozenset({"link", "rate_gbps"}),
    "link_down": frozenset({"link"}),
    "link_up": frozenset({"link"}),
    "worker_kill": frozenset({"host", "restart_after_s"}),
    "controller_restart": frozenset({"down_s"}),
    "switch_restart": frozenset({"switch", "down_s"}),
}
COMMON_FIELDS = frozenset({"kind", "t_s"})
EVENT_KINDS = tuple(EVENT_FIELDS)
MAX_EVENTS = 256
MAX_T_S = 86400.0
DEFAULT_DOWN_S = 2.0  # how long a restarted controller or switch stays dead
EVENTS_FILE = "events.jsonl"
# How long the runner waits for a consequence it measures (detection of a dead
# worker, a restarted worker's hello, routes after a restart, fresh telemetry).
WAIT_S = 30.0


class FaultError(ValueError):
    """A scenario event is malformed; the message names the event and the field."""


@dataclass(frozen=True)
class Event:
    kind: str
    t_s: float
    link: tuple[str, str] | None = None
    rate_gbps: float | None = None
    host: str | None = None
    restart_after_s: float | None = None
    switch: str | None = None
    down_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "t_s": self.t_s}
        for key in sorted(EVENT_FIELDS[self.kind]):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if key == "link" else value
        return out


def _number(raw: dict[str, Any], key: str, where: str, lo: float, hi: float) -> float:
    complaint = number_complaint(raw.get(key), key, lo, hi)
    if complaint is not None:
        raise FaultError(f"{where}: {complaint}")
    return float(raw[key])


def parse_events(raw_events: Any, topo: Topology, origin: str = "scenario") -> list[Event]:
    """The events of a scenario, checked against the topology; sorted by t_s
    (stable, so events at the same time keep their order)."""
    if not isinstance(raw_events, list) or len(raw_events) > MAX_EVENTS:
        raise FaultError(f"{origin}: 'events' must be a list of at most {MAX_EVENTS} events")
    switches = {sw.name for sw in topo.switches}
    gpus = set(topo.gpu_names())
    events = []
    for i, raw in enumerate(raw_events):
        where = f"{origin}: event {i}"
        if not isinstance(raw, dict):
            raise FaultError(f"{where}: expected an object")
        kind = raw.get("kind")
        if not isinstance(kind, str) or kind not in EVENT_FIELDS:
            raise FaultError(f"{where}: kind must be one of {', '.join(EVENT_KINDS)}, got {kind!r}")
        where = f"{where} ({kind})"
        known = COMMON_FIELDS | EVENT_FIELDS[kind]
        bad = sorted(set(raw) - known, key=str)
        if bad:
            raise FaultError(f"{where}: unknown key {bad[0]!r}; known: {', '.join(sorted(known))}")
        t_s = _number(raw, "t_s", where, 0.0, MAX_T_S)
        fields: dict[str, Any] = {}
        if "link" in EVENT_FIELDS[kind]:
            link = raw.get("link")
            if not (isinstance(link, list) and len(link) == 2 and all(isinstance(x, str) for x in link)):
                raise FaultError(f"{where}: link must be a list of two node names, got {link!r}")
            for end in link:
                if end not in topo.nodes:
                    raise FaultError(f"{where}: link end {end!r} is not a node of {topo.name}")
            try:
                key = topo.link_between(link[0], link[1]).key
            except KeyError:
                raise FaultError(f"{where}: link {link[0]}-{link[1]} is not a link of {topo.name}") from None
            fields["link"] = key
        if kind == "link_rate":
            fields["rate_gbps"] = _number(raw, "rate_gbps", where, 1e-3, 1e6)
        if kind == "worker_kill":
            host = raw.get("host")
            if not isinstance(host, str) or host not in gpus:
                raise FaultError(f"{where}: host {host!r} is not a GPU host of {topo.name} "
                                 f"(g0..g{len(gpus) - 1})")
            fields["host"] = host
            if "restart_after_s" in raw:
                fields["restart_after_s"] = _number(raw, "restart_after_s", where, 0.0, MAX_T_S)
        if kind == "switch_restart":
            switch = raw.get("switch")
            if not isinstance(switch, str) or switch not in switches:
                raise FaultError(f"{where}: switch {switch!r} is not a switch of {topo.name}")
            fields["switch"] = switch
        if kind in ("controller_restart", "switch_restart"):
            fields["down_s"] = (_number(raw, "down_s", where, 0.0, 3600.0) if "down_s" in raw
                                else DEFAULT_DOWN_S)
        events.append(Event(kind, t_s, **fields))
    return sorted(events, key=lambda e: e.t_s)


def check_workers(events: Iterable[Event], worker_hosts: Iterable[str], origin: str = "scenario") -> None:
    """Every worker_kill names a host that runs a worker under the placement."""
    hosts = set(worker_hosts)
    for e in events:
        if e.kind == "worker_kill" and e.host not in hosts:
            raise FaultError(f"{origin}: worker_kill host {e.host!r} runs no prefill or decode worker "
                             f"under this placement")


# -- running -----------------------------------------------------------------------------
class FaultRunner:
    """Carries out a scenario's events during one replay and records them.

    ``attach(frontend)`` is called by the replay's frontend (in its event-loop
    thread) once its clock starts; one thread then sleeps until each event is
    due and carries it out.  Whatever touches the frontend or the oracle is
    handed to the frontend's event loop (``frontend.call``); commands on the
    fabric run in the runner's thread.  ``stop()`` ends the thread, records
    events that were not reached, and restores the fabric."""

    def __init__(self, testbed: Any, events: list[Event], run_dir: Path, *, oracle: Any = None,
                 telemetry: Any = None) -> None:
        self.tb = testbed
        self.events = list(events)
        self.path = run_dir / EVENTS_FILE
        self.oracle = oracle
        self.telemetry = telemetry  # the replay's RestTelemetryPoller, when the oracle uses telemetry
        self.frontend: Any = None
        self.t0 = 0.0
        self._queue: list[tuple[float, int, str, Callable[[], dict[str, Any]]]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.links_changed: set[tuple[str, str]] = set()
        self.killed_workers: set[str] = set()

    # -- scheduling --------------------------------------------------------------------
    def attach(self, frontend: Any) -> None:
        self.frontend = frontend
        self.t0 = float(frontend.t0)
        for i, e in enumerate(self.events):
            self._push(e.t_s, f"event {i}", partial(self._run_event, i, e))
        if self.events:
            self._thread = threading.Thread(target=self._loop, name="faults", daemon=True)
            self._thread.start()

    def _push(self, t_s: float, label: str, action: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            heapq.heappush(self._queue, (t_s, self._seq, label, action))
            self._seq += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._queue:
                    break
                t_s, _, _, action = self._queue[0]
            delay = self.t0 + t_s - time.time()
            if delay > 0:
                if self._stop.wait(min(delay, 0.5)):
                    break
                continue
            with self._lock:
                heapq.heappop(self._queue)
            action()

    def stop(self) -> list[dict[str, Any]]:
        """End the thread, record what was not reached, restore the fabric."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT_S + 10)
        with self._lock:
            left = sorted(self._queue)
            self._queue = []
        for t_s, _, label, _ in left:
            self._write({"what": label, "requested_t_s": t_s, "outcome": "skipped: the replay ended before t_s"})
        self._restore()
        return self.records

    # -- records -----------------------------------------------------------------------
    def _now_s(self) -> float:
        return round(time.time() - self.t0, 4)

    def _write(self, rec: dict[str, Any]) -> None:
        with self._lock:
            self.records.append(rec)
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def _run_event(self, i: int, e: Event) -> dict[str, Any]:
        rec: dict[str, Any] = {"event": i, **e.to_json(), "requested_t_s": e.t_s, "actual_t_s": self._now_s()}
        try:
            rec.update(self._do(e))
            rec.setdefault("outcome", "ok")
        except Exception as exc:  # noqa: BLE001 - a failed fault is a recorded outcome, not the end of the run
            rec["outcome"] = f"failed: {type(exc).__name__}: {exc}"
        rec["done_t_s"] = self._now_s()
        self._write(rec)
        return rec

    def _oracle_link(self, link: tuple[str, str], **change: Any) -> None:
        set_link = getattr(self.oracle, "set_link", None)
        if set_link is None:
            return
        if self.frontend is not None:
            self.frontend.call(set_link, link[0], link[1], **change)
        else:
            set_link(link[0], link[1], **change)

    # -- the events --------------------------------------------------------------------
    def _do(self, e: Event) -> dict[str, Any]:
        if e.kind in ("link_down", "link_up"):
            assert e.link is not None
            up = e.kind == "link_up"
            t_event = time.time()
            fabric_faults.set_link_state(self.tb, e.link[0], e.link[1], up)
            self.links_changed.add(e.link)
            self._oracle_link(e.link, up=up)
            return self._await_reroute(e.link, up, t_event)
        if e.kind == "link_rate":
            assert e.link is not None and e.rate_gbps is not None
            # the replay's oracle first: the controller is told over HTTP inside
            # rerate_link, and decisions meanwhile must not price the old rate
            self._oracle_link(e.link, rate_gbps=e.rate_gbps)
            told_gbps = fabric_faults.rerate_link(self.tb, e.link[0], e.link[1], e.rate_gbps)
            self.links_changed.add(e.link)
            return {"emulated_mbps": round(emulated_mbps(e.rate_gbps, self.tb.config.scale), 3),
                    "controller_rate_gbps": told_gbps}
        if e.kind == "worker_kill":
            return self._kill_worker(e)
        if e.kind == "controller_restart":
            return self._restart_controller(float(e.down_s or 0.0))
        if e.kind == "switch_restart":
            assert e.switch is not None
            return self._restart_switch(e.switch, float(e.down_s or 0.0))
        raise FaultError(f"unknown event kind {e.kind!r}")

    def _await_reroute(self, link: tuple[str, str], up: bool, t_event: float) -> dict[str, Any]:
        """The controller's route change for this link (from /status), if it
        comes within WAIT_S: when the port-status reached it and when the last
        switch confirmed the new routes, from ``t_event`` (just before the
        interfaces were set down or up)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            status = self.tb.rest_get("/status") or {}
            for change in reversed(status.get("reroutes") or []):
                if change.get("link") == list(link) and change.get("up") == up and \
                        float(change.get("t_s", 0)) >= t_event:
                    if change.get("confirmed_s") is None:
                        break
                    return {"reroute": {k: change.get(k) for k in ("t_s", "confirmed_s", "switches",
                                                                    "entries_added", "entries_deleted")},
                            "port_status_ms": round((float(change["t_s"]) - t_event) * 1000, 3),
                            "event_to_routes_ms": round((float(change["confirmed_s"]) - t_event) * 1000, 3)}
            time.sleep(0.05)
        return {"reroute": None, "outcome": f"ok (no confirmed route change seen within {WAIT_S:g} s)"}

    def _kill_worker(self, e: Event) -> dict[str, Any]:
        assert e.host is not None
        fe = self.frontend
        pid = fe.kill_worker(e.host)
        killed = time.time()
        self.killed_workers.add(e.host)
        out: dict[str, Any] = {"pid": pid, "role": fe.role_of(e.host)}
        deadline = time.monotonic() + WAIT_S
        loss = None
        while time.monotonic() < deadline and loss is None and not self._stop.is_set():
            loss = next((x for x in list(fe.losses) if x["host"] == e.host and x["t_s"] >= killed - 0.01), None)
            time.sleep(0.02)
        if loss is None:
            out["outcome"] = f"failed: the frontend did not notice within {WAIT_S:g} s"
            return out
        out.update(detected_ms=round((loss["t_s"] - killed) * 1000, 3), detected_by=loss["how"],
                   requests_failed=loss["failed"])
        if e.restart_after_s is not None:
            host = e.host
            self._push(e.t_s + e.restart_after_s, f"restart of {host}",
                       lambda: self._restart_worker(host, e.t_s + float(e.restart_after_s or 0.0)))
        return out

    def _restart_worker(self, host: str, requested_t_s: float) -> dict[str, Any]:
        rec: dict[str, Any] = {"kind": "worker_restart", "host": host, "requested_t_s": requested_t_s,
                               "actual_t_s": self._now_s()}
        try:
            pid, back_s = self.frontend.restart_worker(host, timeout_s=WAIT_S)
            rec.update(pid=pid, back_t_s=round(back_s - self.t0, 4), outcome="ok")
        except Exception as exc:  # noqa: BLE001
            rec["outcome"] = f"failed: {type(exc).__name__}: {exc}"
        rec["done_t_s"] = self._now_s()
        self._write(rec)
        return rec

    def _restart_controller(self, down_s: float) -> dict[str, Any]:
        hops_before = len(self.telemetry().samples) if self.telemetry is not None else 0
        old = fabric_faults.kill_controller(self.tb)
        killed = time.time()
        self._stop.wait(down_s)
        outage = self._probe_oracle()  # what the oracle answers at the end of the outage
        started = time.time()
        timing = fabric_faults.start_controller_again(self.tb)
        out: dict[str, Any] = {"pid_killed": old, "pid": timing["pid"],
                               "down_ms": round((started - killed) * 1000, 3),
                               "api_up_ms": round((timing["api_up_s"] - started) * 1000, 3),
                               "routes_ready_ms": round((timing["routes_ready_s"] - started) * 1000, 3)}
        if outage is not None:
            out["oracle_during_outage"] = outage
        out.update(self._await_fresh_telemetry(started, hops_before))
        after = self._probe_oracle()
        if after is not None:
            out["oracle_after"] = after
        return out

    def _probe_oracle(self) -> dict[str, Any] | None:
        """The oracle's answer now for one cross-fabric pair of the replay
        (the first prefill to the last decode): its source and reason show
        whether it runs on live telemetry or has fallen back."""
        fe = self.frontend
        estimate = getattr(self.oracle, "estimate", None)
        if fe is None or estimate is None or not fe.placement.prefill or not fe.placement.decode:
            return None
        src, dst = fe.placement.prefill[0], fe.placement.decode[-1]
        est = fe.call(estimate, src, dst, 10**9, time.time())
        return {"src": src, "dst": dst, "source": est.source, "reason": est.reason,
                "telemetry_age_ms": None if est.telemetry_age_ms is None else round(est.telemetry_age_ms, 1)}

    def _await_fresh_telemetry(self, since_s: float, hops: int) -> dict[str, Any]:
        """When the replay's telemetry poller next held, for as many hops as
        before the outage, samples all measured after ``since_s``."""
        if self.telemetry is None:
            return {}
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not self._stop.is_set():
            samples = self.telemetry().samples
            if samples and len(samples) >= hops and min(s.t_s for s in samples.values()) > since_s:
                return {"telemetry_resumed_ms": round((time.time() - since_s) * 1000, 3)}
            time.sleep(0.05)
        return {"telemetry_resumed_ms": None}

    def _restart_switch(self, switch: str, down_s: float) -> dict[str, Any]:
        pids = fabric_faults.kill_switch(self.tb, switch)
        killed = time.time()
        self._stop.wait(down_s)
        started = time.time()
        timing = fabric_faults.start_switch_again(self.tb, switch)
        return {"switch_mode": "per_switch" if self.tb.per_switch else "shared",
                "pids_killed": pids, "pid": timing["pid"], "down_ms": round((started - killed) * 1000, 3),
                "routes_ready_ms": round((timing["routes_ready_s"] - started) * 1000, 3)}

    # -- the end -----------------------------------------------------------------------
    def _restore(self) -> None:
        """Links up at their nominal rate, the controller and every switch
        process running: the next replay starts on the fabric as built."""
        for link in sorted(self.links_changed):
            rec: dict[str, Any] = {"kind": "restore", "link": list(link), "actual_t_s": self._now_s()}
            try:
                fabric_faults.set_link_state(self.tb, link[0], link[1], True)
                fabric_faults.rerate_link(self.tb, link[0], link[1], self.tb.topo.link_between(*link).rate_gbps)
                rec["outcome"] = "ok"
            except Exception as exc:  # noqa: BLE001
                rec["outcome"] = f"failed: {type(exc).__name__}: {exc}"
            self._write(rec)
        if self.links_changed or any(e.kind in ("controller_restart", "switch_restart") for e in self.events):
            rec = {"kind": "restore", "what": "controller and switches", "actual_t_s": self._now_s()}
            try:
                rec.update(fabric_faults.ensure_running(self.tb))
                rec["outcome"] = "ok"
            except Exception as exc:  # noqa: BLE001
                rec["outcome"] = f"failed: {type(exc).__name__}: {exc}"
            self._write(rec)
