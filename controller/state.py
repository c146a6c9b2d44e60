"""Controller state as plain logic: routes, connections and link statistics.

Nothing here imports os-ken; every handler takes ``now`` (seconds, wall clock)
as an argument, so the arithmetic is unit-tested without a switch.

Which counter measures which hop
--------------------------------
Each directed hop ``(x, y)`` of the topology is measured at exactly one port:

* ``y``'s port towards ``x``, receive counters, when ``y`` is a switch.  What a
  switch received is what really crossed the link, after any drop in ``x``'s
  egress queue, so a congested link reads its delivered rate, not its offered
  rate.
* ``x``'s port towards ``y``, transmit counters, when ``y`` is a GPU host (the
  controller has no counters inside host namespaces).

Drops and errors of a hop are the transmit drops/errors of ``x``'s port (when
``x`` is a switch) plus the receive drops/errors of ``y``'s port (when ``y`` is
a switch).  The two ends are polled independently, so the other end's counter
is charged to the hop's next sample after it changed; every drop is counted
exactly once.

Intervals come from the switch's own clock (the port's ``duration`` field of the
port-stats reply) when it increases between two samples, else from the time
the controller received the replies.  A counter that goes backwards (the switch
or port restarted) starts a new baseline: no rate is produced for that
interval and ``counter_resets`` counts it.

Rates are kept per hop in a bounded ring buffer, in emulated bit/s and in
real-world Gbit/s (emulated x scale factor).

Poll rounds
-----------
:meth:`ControllerState.begin_poll_round` starts a round for a set of switches;
a switch that has not answered by the time the next round begins counts as a
missing reply (per switch and in total; both appear in :meth:`status`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Iterable

from netkv.stats import percentile
from topologies import Hop, Topology

from .routing import FlowEntry, flow_entries, table_diff, walk

LOG = logging.getLogger("netkv.controller.state")

MIN_POLL_INTERVAL_S = 0.05
MAX_POLL_INTERVAL_S = 60.0
MIN_HISTORY_LEN = 2
MAX_HISTORY_LEN = 100_000
REROUTES_KEPT = 50  # recent route changes /status lists


@dataclass(frozen=True)
class PortCounters:
    t_s: float  # controller receive time (wall clock)
    duration_s: float | None  # switch clock: how long the port has existed
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
    """One measurement of a directed hop over the ``interval_s`` ending at ``t_s``."""

    src: str
    dst: str
    tier: int
    t_s: float  # wall clock when the measuring reply arrived
    interval_s: float
    rate_bps: float  # emulated bit/s
    load_gbps: float  # real-world Gbit/s (rate_bps * scale / 1e9)
    capacity_gbps: float  # real-world configured rate
    utilization: float  # load_gbps / capacity_gbps
    packets: int  # packets in the interval
    drops: int  # port-counter drops charged to this interval
    errors: int  # port-counter errors charged to this interval
    port: str  # where it was measured, e.g. "t1:3 rx"
    clock: str  # "switch" (port duration) or "controller" (receive times)
    controller_interval_s: float = 0.0  # the same interval by controller receive times


@dataclass(frozen=True)
class QueueSample:
    """Egress queue of one switch interface (the root qdisc's figures)."""

    interface: str
    t_s: float
    kind: str  # qdisc kind, e.g. "htb"
    backlog_bytes: int
    backlog_packets: int
    drops_total: int  # cumulative since the qdisc was created
    overlimits_total: int
    sent_bytes_total: int


@dataclass
class _PollRound:
    number: int
    sent_s: float
    outstanding: set[int]


@dataclass
class ControllerState:
    topo: Topology
    scale: float
    poll_interval_s: float = 0.5
    history_len: int = 600
    prefix: str | None = None  # testbed name prefix, for interface names
    routes: dict[str, list[FlowEntry]] = field(default_factory=dict)
    switch_by_dpid: dict[int, str] = field(default_factory=dict)
    connected: dict[int, float] = field(default_factory=dict)
    routes_sent: dict[int, int] = field(default_factory=dict)
    routes_confirmed: dict[int, float] = field(default_factory=dict)
    polls_sent: int = 0
    last_poll_s: float | None = None
    started_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")
        if not MIN_POLL_INTERVAL_S <= self.poll_interval_s <= MAX_POLL_INTERVAL_S:
            raise ValueError(f"poll interval must be {MIN_POLL_INTERVAL_S}..{MAX_POLL_INTERVAL_S} s, "
                             f"got {self.poll_interval_s}")
        if not MIN_HISTORY_LEN <= self.history_len <= MAX_HISTORY_LEN:
            raise ValueError(f"history length must be {MIN_HISTORY_LEN}..{MAX_HISTORY_LEN} samples, "
                             f"got {self.history_len}")
        self.routes = flow_entries(self.topo)
        self.switch_by_dpid = {sw.dpid: sw.name for sw in self.topo.switches}
        # (switch, port) -> [(hop, which counter)] for the hops measured there.
        self._measured_at: dict[tuple[str, int], list[tuple[Hop, str]]] = {}
        # hop -> the switch ports whose drop/error counters are charged to it.
        self._drop_ports: dict[Hop, list[tuple[tuple[str, int], str]]] = {}
        self._iface_hop: dict[str, Hop] = {}
        for link in self.topo.links:
            for x, y in ((link.a, link.b), (link.b, link.a)):
                if not self.topo.node(y).is_gpu:
                    key, counter = (y, link.port_of(y)), "rx"
                else:
                    key, counter = (x, link.port_of(x)), "tx"
                self._measured_at.setdefault(key, []).append(((x, y), counter))
                ends: list[tuple[tuple[str, int], str]] = []
                if not self.topo.node(x).is_gpu:
                    ends.append(((x, link.port_of(x)), "tx"))
                    if self.prefix:
                        self._iface_hop[self.interface_name(x, link.port_of(x))] = (x, y)
                if not self.topo.node(y).is_gpu:
                    ends.append(((y, link.port_of(y)), "rx"))
                self._drop_ports[(x, y)] = ends
        self._last: dict[tuple[str, int], PortCounters] = {}
        self._history: dict[Hop, deque[HopRate]] = {}
        # (hop, port key) -> (dropped, errors) already charged to the hop
        self._drop_base: dict[tuple[Hop, tuple[str, int]], tuple[int, int]] = {}
        self._drops_total: dict[Hop, int] = {}
        self._errors_total: dict[Hop, int] = {}
        self._queues: dict[Hop, QueueSample] = {}
        self._queue_errors = 0
        self._queue_rounds = 0
        self._queue_last_error: str | None = None
        self.counter_resets = 0
        self.replies_received = 0
        self.replies_late = 0
        self.replies_missing = 0
        self.missing_by_switch: dict[str, int] = {}
        self._round: _PollRound | None = None
        self._reply_latency_s: deque[float] = deque(maxlen=1000)
        self.poller_alive = False
        self.poller_error: str | None = None
        self.poller_died_s: float | None = None
        self.poll_round_failures = 0
        # Port-status: switch ports reported down, links out of service (Link.key)
        # and the route changes they caused (newest last).
        self.ports_down: set[tuple[str, int]] = set()
        self.switches_down: set[str] = set()  # disconnected while this controller ran
        self.links_down: set[tuple[str, str]] = set()
        # Links whose configured rate the operator changed (Link.key -> real
        # Gbit/s, POST /links/<a>/<b>): utilisation and the oracle use it.
        self.capacity_overrides_gbps: dict[tuple[str, str], float] = {}
        self.reroutes: deque[dict[str, object]] = deque(maxlen=REROUTES_KEPT)
        self.routes_version = 0
        self._link_at: dict[tuple[str, int], tuple[str, str]] = {
            (node, link.port_of(node)): link.key for link in self.topo.links for node in (link.a, link.b)}
        self._lock = threading.Lock()

    # -- names ----------------------------------------------------------------
    def interface_name(self, switch: str, port: int) -> str:
        """The Linux interface of a switch port as the testbed names it."""
        if not self.prefix:
            raise ValueError("interface names need the testbed prefix (--prefix)")
        return f"{self.prefix}{switch}-eth{port}"

    def egress_interface(self, src: str, dst: str) -> str | None:
        """The switch interface whose egress queue feeds hop src->dst (None
        when src is a GPU host: that queue is inside the host's namespace)."""
        if not self.prefix or self.topo.node(src).is_gpu:
            return None
        return self.interface_name(src, self.topo.port_to(src, dst))

    # -- connections and routes ---------------------------------------------
    def on_connect(self, dpid: int, now: float) -> dict[str, tuple[list[FlowEntry], list[FlowEntry]]]:
        """A switch finished its handshake.  One that had disconnected while
        this controller ran is back in service: returns the route changes."""
        with self._lock:
            self.connected[dpid] = now
            name = self.switch_by_dpid.get(dpid)
            if name is None or name not in self.switches_down:
                return {}
            self.switches_down.discard(name)
            return self._recompute(now, {"switch": name, "link": None, "up": True, "reported_by": name})

    def on_disconnect(self, dpid: int, now: float) -> dict[str, tuple[list[FlowEntry], list[FlowEntry]]]:
        """A switch's connection ended.  While this controller runs that means
        the switch (its process) failed: its links are out of service until it
        is back, and the route changes that follow are returned."""
        with self._lock:
            self.connected.pop(dpid, None)
            self.routes_confirmed.pop(dpid, None)
            if self._round is not None:
                self._round.outstanding.discard(dpid)
            name = self.switch_by_dpid.get(dpid)
            if name is None:
                return {}
            # A reconnecting switch restarts its counters: forget the baseline.
            for key in [k for k in self._last if k[0] == name]:
                del self._last[key]
            self.switches_down.add(name)
            return self._recompute(now, {"switch": name, "link": None, "up": False, "reported_by": name})

    def on_routes_sent(self, dpid: int, count: int, now: float) -> None:
        with self._lock:
            self.routes_sent[dpid] = count
            self.routes_confirmed.pop(dpid, None)

    def on_routes_confirmed(self, dpid: int, now: float) -> None:
        with self._lock:
            if dpid in self.routes_sent:
                self.routes_confirmed[dpid] = now
            name = self.switch_by_dpid.get(dpid)
            for change in self.reroutes:
                pending = change["pending"]
                assert isinstance(pending, list)
                if name in pending:
                    pending.remove(name)
                    if not pending:
                        change["confirmed_s"] = now
                        change["confirm_ms"] = round((now - float(change["t_s"])) * 1000, 3)  # type: ignore[arg-type]

    def on_port_status(self, dpid: int, port_no: int, up: bool, now: float
                       ) -> dict[str, tuple[list[FlowEntry], list[FlowEntry]]]:
        """A switch reported a port up or down (OpenFlow port-status, or the
        port descriptions a switch sends when it connects).  A link is out of
        service while either of its switch ends reports it down.  When the set
        of links out of service changes, every route is computed again and the
        changes per switch are returned (to add, to delete), to be sent at once;
        the change is kept for /status with the time its last switch confirmed it."""
        name = self.switch_by_dpid.get(dpid)
        if name is None:
            return {}
        with self._lock:
            key = self._link_at.get((name, port_no))
            if key is None:
                return {}
            (self.ports_down.discard if up else self.ports_down.add)((name, port_no))
            return self._recompute(now, {"switch": None, "link": list(key), "up": up,
                                         "reported_by": f"{name}:{port_no}"})

    def _recompute(self, now: float, cause: dict[str, object]) -> dict[str, tuple[list[FlowEntry], list[FlowEntry]]]:
        """Routes for the links now out of service (ports down, and every link
        of a switch that is down); the per-switch changes, recorded with their
        cause.  Called with the lock held."""
        down = {self._link_at[p] for p in self.ports_down}
        down |= {link.key for link in self.topo.links if link.a in self.switches_down or link.b in self.switches_down}
        if down == self.links_down:
            return {}
        self.links_down = down
        new = flow_entries(self.topo, down)
        changes: dict[str, tuple[list[FlowEntry], list[FlowEntry]]] = {}
        for switch, entries in new.items():
            add, delete = table_diff(self.routes.get(switch, []), entries)
            if add or delete:
                changes[switch] = (add, delete)
        self.routes = new
        self.routes_version += 1
        self.reroutes.append({
            "t_s": now, **cause, "links_down": sorted(list(k) for k in down),
            "switches": sorted(changes), "entries_added": sum(len(a) for a, _ in changes.values()),
            "entries_deleted": sum(len(d) for _, d in changes.values()),
            "pending": sorted(changes), "confirmed_s": None if changes else now,
            "confirm_ms": None if changes else 0.0})
        return changes

    def installed_path(self, src: str, dst: str) -> list[str]:
        """The node path traffic from src to dst takes through the routes this
        controller has installed (its current tables), walked hop by hop."""
        with self._lock:
            tables = self.routes
        return walk(self.topo, tables, src, dst)

    # -- poller bookkeeping ---------------------------------------------------
    def begin_poll_round(self, now: float, dpids: Iterable[int]) -> int:
        """Start a statistics round for ``dpids``; closes the previous round,
        counting every switch that did not answer it.  Returns the round number."""
        with self._lock:
            prev = self._round
            if prev is not None:
                for dpid in sorted(prev.outstanding):
                    name = self.switch_by_dpid.get(dpid, hex(dpid))
                    self.replies_missing += 1
                    self.missing_by_switch[name] = self.missing_by_switch.get(name, 0) + 1
                    LOG.warning("switch %s did not answer statistics round %d within %.3f s",
                                name, prev.number, now - prev.sent_s)
            number = (prev.number + 1) if prev is not None else 1
            self._round = _PollRound(number, now, set(dpids))
            self.polls_sent += 1
            self.last_poll_s = now
            self.poller_alive = True
            return number

    def on_stats_reply(self, dpid: int, now: float) -> None:
        """A (final part of a) port-stats reply from ``dpid`` arrived."""
        with self._lock:
            rnd = self._round
            if rnd is not None and dpid in rnd.outstanding:
                rnd.outstanding.discard(dpid)
                self.replies_received += 1
                self._reply_latency_s.append(max(0.0, now - rnd.sent_s))
            else:
                self.replies_late += 1

    def on_poll_round_failed(self, now: float, error: str) -> None:
        with self._lock:
            self.poll_round_failures += 1
            self.poller_error = error

    def on_poller_died(self, now: float, error: str) -> None:
        with self._lock:
            self.poller_alive = False
            self.poller_died_s = now
            self.poller_error = error

    def poller_health(self, now: float) -> dict[str, object]:
        with self._lock:
            return self._poller_health_locked(now)

    def _poller_health_locked(self, now: float) -> dict[str, object]:
        age = None if self.last_poll_s is None else now - self.last_poll_s
        stalled = age is not None and age > 3 * self.poll_interval_s + 1.0
        lat = sorted(self._reply_latency_s)
        return {
            "alive": self.poller_alive and not stalled,
            "started": self.last_poll_s is not None,
            "stalled": stalled,
            "died_s": self.poller_died_s,
            "last_round_age_s": None if age is None else round(age, 3),
            "rounds": self.polls_sent,
            "round_failures": self.poll_round_failures,
            "replies_received": self.replies_received,
            "replies_missing": self.replies_missing,
            "replies_late": self.replies_late,
            "missing_by_switch": dict(sorted(self.missing_by_switch.items())),
            "reply_latency_ms_p50": _percentile_ms(lat, 50),
            "reply_latency_ms_p95": _percentile_ms(lat, 95),
            "counter_resets": self.counter_resets,
            "last_error": self.poller_error,
        }

    def status(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
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
                "prefix": self.prefix,
                "history_len": self.history_len,
                "hops_measured": sum(1 for r in self._history.values() if r),
                "hops_total": 2 * len(self.topo.links),
                "poller": self._poller_health_locked(now),
                "queues": {"rounds": self._queue_rounds, "errors": self._queue_errors,
                           "interfaces": len(self._queues), "last_error": self._queue_last_error},
                "links_down": sorted(list(k) for k in self.links_down),
                "switches_down": sorted(self.switches_down),
                "routes_version": self.routes_version,
                "reroutes": [dict(change, pending=list(change["pending"]))  # type: ignore[call-overload]
                             for change in self.reroutes],
            }

    # -- statistics -----------------------------------------------------------
    def on_port_stats(self, dpid: int, port_no: int, now: float, *, rx_bytes: int, tx_bytes: int,
                      rx_packets: int, tx_packets: int, rx_dropped: int, tx_dropped: int,
                      rx_errors: int, tx_errors: int, duration_s: float | None = None) -> list[HopRate]:
        """Feed one port's counters; returns the hop rates it produced."""
        switch = self.switch_by_dpid.get(dpid)
        if switch is None:
            return []
        key = (switch, port_no)
        hops = self._measured_at.get(key)
        sample = PortCounters(now, duration_s, rx_bytes, tx_bytes, rx_packets, tx_packets,
                              rx_dropped, tx_dropped, rx_errors, tx_errors)
        produced: list[HopRate] = []
        with self._lock:
            prev = self._last.get(key)
            self._last[key] = sample
            if prev is None or hops is None:
                return []
            if _went_backwards(prev, sample):
                self.counter_resets += 1
                LOG.info("counters of %s port %d went backwards: new baseline", switch, port_no)
                return []
            interval, clock = _interval_s(prev, sample)
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
                drops, errors = self._charge_drops((x, y))
                rate_bps = nbytes * 8 / interval
                load_gbps = rate_bps * self.scale / 1e9
                capacity_gbps = self.capacity_overrides_gbps.get(link.key, link.rate_gbps)
                rate = HopRate(x, y, link.tier, now, interval, rate_bps, load_gbps, capacity_gbps,
                               load_gbps / capacity_gbps, packets, drops, errors,
                               f"{switch}:{port_no} {counter}", clock, now - prev.t_s)
                ring = self._history.get((x, y))
                if ring is None:
                    ring = self._history[(x, y)] = deque(maxlen=self.history_len)
                ring.append(rate)
                produced.append(rate)
        return produced

    def set_capacity(self, a: str, b: str, rate_gbps: float) -> float:
        """The link a-b (either order) is now configured at ``rate_gbps`` real
        Gbit/s, both directions; the topology's rate again clears the change.
        Returns the link's previous configured rate."""
        link = self.topo.link_between(a, b)  # KeyError: no such link
        if isinstance(rate_gbps, bool) or not isinstance(rate_gbps, (int, float)) \
                or not (math.isfinite(rate_gbps) and rate_gbps > 0):
            raise ValueError(f"rate_gbps must be a finite number > 0, got {rate_gbps!r}")
        with self._lock:
            before = self.capacity_overrides_gbps.get(link.key, link.rate_gbps)
            if float(rate_gbps) == link.rate_gbps:
                self.capacity_overrides_gbps.pop(link.key, None)
            else:
                self.capacity_overrides_gbps[link.key] = float(rate_gbps)
        return before

    def capacity_gbps(self, a: str, b: str) -> float:
        """The link a-b's configured rate now (real Gbit/s)."""
        link = self.topo.link_between(a, b)
        return self.capacity_overrides_gbps.get(link.key, link.rate_gbps)

    def _charge_drops(self, hop: Hop) -> tuple[int, int]:
        """Drops and errors of both ends of ``hop`` not yet charged to it."""
        drops = errors = 0
        for port_key, direction in self._drop_ports.get(hop, []):
            cur = self._last.get(port_key)
            if cur is None:
                continue
            d_now = cur.tx_dropped if direction == "tx" else cur.rx_dropped
            e_now = cur.tx_errors if direction == "tx" else cur.rx_errors
            base = self._drop_base.get((hop, port_key))
            self._drop_base[(hop, port_key)] = (d_now, e_now)
            if base is None:
                continue
            drops += max(0, d_now - base[0])
            errors += max(0, e_now - base[1])
        self._drops_total[hop] = self._drops_total.get(hop, 0) + drops
        self._errors_total[hop] = self._errors_total.get(hop, 0) + errors
        return drops, errors

    def on_queue_stats(self, samples: Iterable[QueueSample], now: float) -> int:
        """Feed egress-queue figures of switch interfaces; returns how many
        belonged to a hop of the topology."""
        used = 0
        with self._lock:
            self._queue_rounds += 1
            for s in samples:
                hop = self._iface_hop.get(s.interface)
                if hop is None:
                    continue
                self._queues[hop] = s
                used += 1
        return used

    def on_queue_error(self, now: float, error: str) -> None:
        with self._lock:
            self._queue_errors += 1
            self._queue_last_error = error

    # -- reading ----------------------------------------------------------------
    def latest(self) -> list[HopRate]:
        with self._lock:
            return [ring[-1] for ring in self._history.values() if ring]

    def history(self, src: str, dst: str) -> list[HopRate]:
        with self._lock:
            return list(self._history.get((src, dst), ()))

    def totals(self) -> dict[Hop, tuple[int, int]]:
        """Cumulative (drops, errors) per hop since the controller started."""
        with self._lock:
            return {hop: (self._drops_total.get(hop, 0), self._errors_total.get(hop, 0))
                    for hop in self._drops_total}

    def queues(self) -> dict[Hop, QueueSample]:
        with self._lock:
            return dict(self._queues)

    def links_json(self, now: float) -> list[dict[str, object]]:
        """Latest figures of every measured hop, busiest first."""
        queues = self.queues()
        totals = self.totals()
        rows = []
        for rate in self.latest():
            row = hop_rate_json(rate)
            row["age_ms"] = round((now - rate.t_s) * 1000, 3)
            hop = (rate.src, rate.dst)
            row["drops_total"], row["errors_total"] = totals.get(hop, (0, 0))
            q = queues.get(hop)
            row["queue"] = None if q is None else queue_json(q, now)
            rows.append(row)
        rows.sort(key=lambda r: (-float(r["utilization"]), str(r["src"]), str(r["dst"])))  # type: ignore[arg-type]
        return rows


def hop_rate_json(rate: HopRate) -> dict[str, object]:
    row: dict[str, object] = asdict(rate)
    row["rate_mbps"] = rate.rate_bps / 1e6
    return row


def queue_json(q: QueueSample, now: float) -> dict[str, object]:
    return {"interface": q.interface, "kind": q.kind, "backlog_bytes": q.backlog_bytes,
            "backlog_packets": q.backlog_packets, "drops_total": q.drops_total,
            "overlimits_total": q.overlimits_total, "age_ms": round((now - q.t_s) * 1000, 3)}


def _went_backwards(prev: PortCounters, cur: PortCounters) -> bool:
    if (cur.rx_bytes < prev.rx_bytes or cur.tx_bytes < prev.tx_bytes
            or cur.rx_packets < prev.rx_packets or cur.tx_packets < prev.tx_packets):
        return True
    return prev.duration_s is not None and cur.duration_s is not None and cur.duration_s < prev.duration_s


def _interval_s(prev: PortCounters, cur: PortCounters) -> tuple[float, str]:
    if prev.duration_s is not None and cur.duration_s is not None and cur.duration_s > prev.duration_s:
        return cur.duration_s - prev.duration_s, "switch"
    return cur.t_s - prev.t_s, "controller"


def _percentile_ms(values_s: list[float], pct: float) -> float | None:
    value = percentile(values_s, pct)
    return None if value is None else round(value * 1000, 3)
