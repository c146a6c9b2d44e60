"""Controller state as plain logic: routes, connections and link statistics.

Nothing here imports os-ken; every handler takes ``now`` (seconds, wall clock)
as an argument, so the arithmetic is unit-tested without a switch.

Link statistics.  Each directed hop ``(x, y)`` of the topology is measured at
one port: at ``y``'s port towards ``x`` (its receive counters) when ``y`` is a
switch, else at ``x``'s port towards ``y`` (its transmit counters).  Receive
counters at the far end count what really crossed the link, after any queue
drop at the sender.  Rates are computed from consecutive counter samples of the
same port and kept per hop in a bounded ring buffer.  Rates are reported in
emulated bit/s and in real-world Gbit/s (emulated x scale factor).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import asdict, dataclass, field

from topologies import Hop, Topology

from .routing import FlowEntry, flow_entries


@dataclass(frozen=True)
class PortCounters:
    t_s: float
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_dropped: int
    tx_dropped: int
    rx_errors: int
    tx_errors: int


@dataclass(frozen=True)
class HopRate:
    """One measurement of a directed hop over [t_start_s, t_s]."""

    src: str
    dst: str
    tier: int
    t_s: float
    interval_s: float
    rate_bps: float  # emulated bit/s
    load_gbps: float  # real-world Gbit/s (rate_bps * scale / 1e9)
    capacity_gbps: float  # real-world configured rate
    utilization: float
    packets: int
    drops: int
    errors: int


@dataclass
class ControllerState:
    topo: Topology
    scale: float
    poll_interval_s: float = 0.5
    history_len: int = 600
    routes: dict[str, list[FlowEntry]] = field(default_factory=dict)
    switch_by_dpid: dict[int, str] = field(default_factory=dict)
    connected: dict[int, float] = field(default_factory=dict)
    routes_sent: dict[int, int] = field(default_factory=dict)
    routes_confirmed: dict[int, float] = field(default_factory=dict)
    polls_sent: int = 0
    last_poll_s: float | None = None
    started_s: float = 0.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if not 0.05 <= self.poll_interval_s <= 60:
            raise ValueError(f"poll interval must be 0.05..60 s, got {self.poll_interval_s}")
        self.routes = flow_entries(self.topo)
        self.switch_by_dpid = {sw.dpid: sw.name for sw in self.topo.switches}
        # (switch, port) -> (hop, which counter) for the hop measured there.
        self._measured_at: dict[tuple[str, int], list[tuple[Hop, str]]] = {}
        for link in self.topo.links:
            for x, y in ((link.a, link.b), (link.b, link.a)):
                if not self.topo.node(y).is_gpu:
                    key, counter = (y, link.port_of(y)), "rx"
                else:
                    key, counter = (x, link.port_of(x)), "tx"
                self._measured_at.setdefault(key, []).append(((x, y), counter))
        self._last: dict[tuple[str, int], PortCounters] = {}
        self._history: dict[Hop, deque[HopRate]] = {}
        self._lock = threading.Lock()

    # -- connections and routes ---------------------------------------------
    def on_connect(self, dpid: int, now: float) -> None:
        with self._lock:
            self.connected[dpid] = now

    def on_disconnect(self, dpid: int, now: float) -> None:
        with self._lock:
            self.connected.pop(dpid, None)
            self.routes_confirmed.pop(dpid, None)

    def on_routes_sent(self, dpid: int, count: int, now: float) -> None:
        with self._lock:
            self.routes_sent[dpid] = count
            self.routes_confirmed.pop(dpid, None)

    def on_routes_confirmed(self, dpid: int, now: float) -> None:
        with self._lock:
            if dpid in self.routes_sent:
                self.routes_confirmed[dpid] = now

    def status(self) -> dict[str, object]:
        with self._lock:
            expected = len(self.switch_by_dpid)
            known_connected = [d for d in self.connected if d in self.switch_by_dpid]
            ready = [d for d in self.routes_confirmed if d in self.switch_by_dpid]
            return {
                "topology": self.topo.name,
                "switches_expected": expected,
                "switches_connected": len(known_connected),
                "switches_ready": len(ready),
                "ready": len(ready) == expected,
                "flow_entries": sum(len(v) for v in self.routes.values()),
                "poll_interval_s": self.poll_interval_s,
                "polls_sent": self.polls_sent,
                "scale": self.scale,
            }

    # -- statistics -----------------------------------------------------------
    def on_poll_sent(self, now: float) -> None:
        with self._lock:
            self.polls_sent += 1
            self.last_poll_s = now

    def on_port_stats(self, dpid: int, port_no: int, now: float, *, rx_bytes: int, tx_bytes: int,
                      rx_packets: int, tx_packets: int, rx_dropped: int, tx_dropped: int,
                      rx_errors: int, tx_errors: int) -> list[HopRate]:
        """Feed one port's counters; returns the hop rates it produced."""
        switch = self.switch_by_dpid.get(dpid)
        if switch is None:
            return []
        key = (switch, port_no)
        hops = self._measured_at.get(key)
        sample = PortCounters(now, rx_bytes, tx_bytes, rx_packets, tx_packets,
                              rx_dropped, tx_dropped, rx_errors, tx_errors)
        produced: list[HopRate] = []
        with self._lock:
            prev = self._last.get(key)
            self._last[key] = sample
            if prev is None or hops is None:
                return []
            interval = now - prev.t_s
            if interval <= 0:
                return []
            for (x, y), counter in hops:
                link = self.topo.link_between(x, y)
                if counter == "rx":
                    nbytes = rx_bytes - prev.rx_bytes
                    packets = rx_packets - prev.rx_packets
                else:
                    nbytes = tx_bytes - prev.tx_bytes
                    packets = tx_packets - prev.tx_packets
                if nbytes < 0 or packets < 0:  # counters reset (switch restarted)
                    continue
                drops = max(0, (rx_dropped - prev.rx_dropped) + (tx_dropped - prev.tx_dropped))
                errors = max(0, (rx_errors - prev.rx_errors) + (tx_errors - prev.tx_errors))
                rate_bps = nbytes * 8 / interval
                load_gbps = rate_bps * self.scale / 1e9
                rate = HopRate(x, y, link.tier, now, interval, rate_bps, load_gbps, link.rate_gbps,
                               load_gbps / link.rate_gbps, packets, drops, errors)
                ring = self._history.get((x, y))
                if ring is None:
                    ring = self._history[(x, y)] = deque(maxlen=self.history_len)
                ring.append(rate)
                produced.append(rate)
        return produced

    def latest(self) -> list[HopRate]:
        with self._lock:
            return [ring[-1] for ring in self._history.values() if ring]

    def history(self, src: str, dst: str) -> list[HopRate]:
        with self._lock:
            return list(self._history.get((src, dst), ()))

    def links_json(self, now: float) -> list[dict[str, object]]:
        rows = []
        for rate in self.latest():
            row = asdict(rate)
            row["age_ms"] = round((now - rate.t_s) * 1000, 3)
            rows.append(row)
        rows.sort(key=lambda r: (-float(r["utilization"]), str(r["src"]), str(r["dst"])))  # type: ignore[arg-type]
        return rows
