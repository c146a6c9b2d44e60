"""The os-ken (Ryu) OpenFlow 1.3 application: a thin shim over plain logic.

* Routing: when a switch of the topology connects, its compressed route table
  from :mod:`controller.routing` is installed (after deleting any entry that
  carries this controller's cookie), followed by a barrier; the barrier reply
  marks the switch ready.  Hosts get static ARP entries from the testbed, so
  no ARP or broadcast is ever forwarded and anything unrouted is dropped by the
  table-miss behaviour of a secure-mode bridge.
* Faults: port-status messages (and the port descriptions a switch sends
  when it connects) mark links out of service, and so does a switch whose
  connection ends while this controller runs (all its links, until it is
  back); the routes they cut move to
  the remaining equal-cost paths (:meth:`ControllerState.on_port_status`),
  sent as the difference per switch (changed entries overwritten, stale ones
  deleted strictly, the rest untouched) with a barrier whose reply times it.
  Switches run in fail-secure mode: while this controller is away they keep
  forwarding on the entries they hold; when it is back they reconnect and
  their routes are installed afresh.
* Statistics: one thread polls port statistics from every switch each
  interval (see :meth:`NetKVController._poll_loop`); a second reads egress
  queues with ``tc`` and watches the first.
* Everything the REST API serves comes from :class:`controller.state.ControllerState`,
  which knows nothing of os-ken.

The process is started by ``python -m controller`` which sets :data:`RUNTIME`
before os-ken instantiates this class.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from os_ken.base import app_manager
from os_ken.controller import ofp_event
from os_ken.controller.handler import CONFIG_DISPATCHER, DEAD_DISPATCHER, MAIN_DISPATCHER, set_ev_cls
from os_ken.lib import hub
from os_ken.ofproto import ofproto_v1_3

from .routing import FLOW_COOKIE
from .state import ControllerState

LOG = logging.getLogger("netkv.controller")

# Set by controller.__main__ before the app manager instantiates the app.
RUNTIME: ControllerState | None = None
# Seconds between reads of the switch interfaces' queues with tc (0: never).
QUEUE_INTERVAL_S: float = 1.0
# Network namespaces whose switch interfaces tc reads (empty: this namespace).
QUEUE_NETNS: tuple[str, ...] = ()


class NetKVController(app_manager.OSKenApp):  # type: ignore[misc]
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if RUNTIME is None:
            raise RuntimeError("controller state not configured; start with python -m controller")
        self.state: ControllerState = RUNTIME
        self.datapaths: dict[int, Any] = {}
        self.poller = hub.spawn(self._poll_loop)
        self.queue_reader = hub.spawn(self._queue_loop)

    # -- connection tracking --------------------------------------------------
    @set_ev_cls(ofp_event.EventOFPSwitchFeatures, CONFIG_DISPATCHER)
    def _on_features(self, ev: Any) -> None:
        dp = ev.msg.datapath
        name = self.state.switch_by_dpid.get(dp.id)
        if name is None:
            LOG.warning("datapath %#x is not part of topology %s; ignoring it", dp.id, self.state.topo.name)
            return
        self._install_routes(dp, name)

    @set_ev_cls(ofp_event.EventOFPStateChange, [MAIN_DISPATCHER, DEAD_DISPATCHER])
    def _on_state(self, ev: Any) -> None:
        dp = ev.datapath
        if dp.id is None:
            return
        if ev.state == MAIN_DISPATCHER:
            self.datapaths[dp.id] = dp
            self._apply(self.state.on_connect(dp.id, time.time()))
        elif ev.state == DEAD_DISPATCHER:
            self.datapaths.pop(dp.id, None)
            self._apply(self.state.on_disconnect(dp.id, time.time()))

    def _install_routes(self, dp: Any, name: str) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(parser.OFPFlowMod(
            dp, cookie=FLOW_COOKIE, cookie_mask=0xFFFFFFFFFFFFFFFF, table_id=ofp.OFPTT_ALL,
            command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
            match=parser.OFPMatch()))
        entries = self.state.routes.get(name, [])
        for entry in entries:
            fields = self._match_fields(entry)
            actions = [parser.OFPActionOutput(entry.out_port)]
            inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]
            dp.send_msg(parser.OFPFlowMod(
                dp, cookie=FLOW_COOKIE, priority=entry.priority,
                match=parser.OFPMatch(**fields), instructions=inst))
        dp.send_msg(parser.OFPBarrierRequest(dp))
        self.state.on_routes_sent(dp.id, len(entries), time.time())

    @set_ev_cls(ofp_event.EventOFPPortStatus, MAIN_DISPATCHER)
    def _on_port_status(self, ev: Any) -> None:
        msg = ev.msg
        ofp = msg.datapath.ofproto
        desc = msg.desc
        up = msg.reason != ofp.OFPPR_DELETE and self._port_up(desc, ofp)
        LOG.info("port-status: switch %#x port %d %s", msg.datapath.id, desc.port_no, "up" if up else "down")
        self._apply(self.state.on_port_status(msg.datapath.id, desc.port_no, up, time.time()))

    @set_ev_cls(ofp_event.EventOFPPortDescStatsReply, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _on_port_desc(self, ev: Any) -> None:
        """The ports a (re)connecting switch has: a port that went down while
        this controller was away is learnt here."""
        msg = ev.msg
        ofp = msg.datapath.ofproto
        now = time.time()
        for desc in msg.body:
            if desc.port_no <= ofp.OFPP_MAX:
                self._apply(self.state.on_port_status(msg.datapath.id, desc.port_no,
                                                      self._port_up(desc, ofp), now), msg.datapath)

    @staticmethod
    def _port_up(desc: Any, ofp: Any) -> bool:
        return not (desc.state & ofp.OFPPS_LINK_DOWN) and not (desc.config & ofp.OFPPC_PORT_DOWN)

    def _apply(self, changes: dict[str, tuple[list[Any], list[Any]]], connecting: Any = None) -> None:
        """Send each switch its route changes, then a barrier (its reply
        confirms the change in ControllerState).  ``connecting``: the datapath
        whose port descriptions caused them (not yet in ``datapaths``)."""
        by_name = {name: dpid for dpid, name in self.state.switch_by_dpid.items()}
        for name, (add, delete) in changes.items():
            dp = self.datapaths.get(by_name[name])
            if dp is None and connecting is not None and connecting.id == by_name[name]:
                dp = connecting
            if dp is None:
                continue  # not connected: it gets the whole table when it connects
            ofp, parser = dp.ofproto, dp.ofproto_parser
            for entry in add:
                actions = [parser.OFPActionOutput(entry.out_port)]
                dp.send_msg(parser.OFPFlowMod(
                    dp, cookie=FLOW_COOKIE, priority=entry.priority, command=ofp.OFPFC_ADD,
                    match=parser.OFPMatch(**self._match_fields(entry)),
                    instructions=[parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]))
            for entry in delete:
                dp.send_msg(parser.OFPFlowMod(
                    dp, cookie=FLOW_COOKIE, cookie_mask=0xFFFFFFFFFFFFFFFF, priority=entry.priority,
                    command=ofp.OFPFC_DELETE_STRICT, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
                    match=parser.OFPMatch(**self._match_fields(entry))))
            dp.send_msg(parser.OFPBarrierRequest(dp))
            LOG.info("routes of %s changed: %d entries written, %d deleted", name, len(add), len(delete))

    @staticmethod
    def _match_fields(entry: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"eth_type": 0x0800, "ipv4_dst": entry.ipv4_dst}
        if entry.ipv4_src is not None:
            fields["ipv4_src"] = entry.ipv4_src
        return fields

    # Also in CONFIG_DISPATCHER: _on_features runs in this app's own thread and
    # may send the routes and their barrier before os-ken's handshake handler
    # asks for the port descriptions; the switch then answers the barrier while
    # the datapath is still in CONFIG_DISPATCHER, and a MAIN-only handler would
    # never see the reply (the switch would stay "not ready").
    @set_ev_cls(ofp_event.EventOFPBarrierReply, [CONFIG_DISPATCHER, MAIN_DISPATCHER])
    def _on_barrier(self, ev: Any) -> None:
        self.state.on_routes_confirmed(ev.msg.datapath.id, time.time())

    # -- statistics -----------------------------------------------------------
    def _poll_loop(self) -> None:
        """One thread: every interval, request port statistics from every
        connected switch.  Rounds run on a fixed schedule (a slow round does not
        shift the next ones).  A switch that has not answered when the next
        round starts is counted as missing (see ``ControllerState``).  A failure
        in one round is logged and counted and the loop goes on; if the thread
        ever leaves the loop, it logs at CRITICAL and /status shows the poller
        dead."""
        try:
            next_s = time.monotonic()
            while True:
                try:
                    dps = list(self.datapaths.values())
                    self.state.begin_poll_round(time.time(), [dp.id for dp in dps])
                    for dp in dps:
                        parser, ofp = dp.ofproto_parser, dp.ofproto
                        dp.send_msg(parser.OFPPortStatsRequest(dp, 0, ofp.OFPP_ANY))
                except Exception as exc:  # noqa: BLE001 - keep polling, but loudly
                    LOG.exception("statistics poll round failed")
                    self.state.on_poll_round_failed(time.time(), repr(exc))
                next_s += self.state.poll_interval_s
                delay = next_s - time.monotonic()
                if delay < 0:  # overran: skip the missed ticks instead of bursting
                    next_s = time.monotonic()
                    delay = 0.0
                hub.sleep(delay)
        except BaseException as exc:
            LOG.critical("statistics poller died: %r; link telemetry is frozen", exc)
            self.state.on_poller_died(time.time(), repr(exc))
            raise

    def _queue_loop(self) -> None:
        """Reads egress-queue figures with tc every ``queue_interval_s`` and
        watches the poller thread: if it died, says so at CRITICAL every 10 s."""
        from .queues import QueueReader, QueueReadError

        interval = QUEUE_INTERVAL_S
        last_warned = 0.0
        failures = 0
        reader = None
        while True:
            now = time.time()
            if not self.poller.is_alive() and now - last_warned >= 10.0:
                LOG.critical("statistics poller thread is dead: link telemetry is frozen")
                self.state.on_poller_died(now, self.state.poller_error or "poller thread exited")
                last_warned = now
            if self.state.prefix and interval > 0:
                try:
                    if reader is None:
                        reader = QueueReader(self.state.prefix, QUEUE_NETNS)
                    self.state.on_queue_stats(reader.read(now), now)
                    failures = 0
                except (QueueReadError, OSError) as exc:
                    failures += 1
                    self.state.on_queue_error(now, str(exc))
                    if failures in (1, 10) or failures % 100 == 0:
                        LOG.warning("cannot read queue statistics (%d failures): %s", failures, exc)
            hub.sleep(interval if interval > 0 else 1.0)

    @set_ev_cls(ofp_event.EventOFPPortStatsReply, MAIN_DISPATCHER)
    def _on_port_stats(self, ev: Any) -> None:
        now = time.time()
        msg = ev.msg
        dpid = msg.datapath.id
        for stat in msg.body:
            duration_s = None
            if getattr(stat, "duration_sec", None) is not None and stat.duration_sec != 0xFFFFFFFF:
                duration_s = stat.duration_sec + stat.duration_nsec / 1e9
            self.state.on_port_stats(
                dpid, stat.port_no, now,
                rx_bytes=stat.rx_bytes, tx_bytes=stat.tx_bytes,
                rx_packets=stat.rx_packets, tx_packets=stat.tx_packets,
                rx_dropped=stat.rx_dropped, tx_dropped=stat.tx_dropped,
                rx_errors=stat.rx_errors, tx_errors=stat.tx_errors,
                duration_s=duration_s)
        if not msg.flags & msg.datapath.ofproto.OFPMPF_REPLY_MORE:
            self.state.on_stats_reply(dpid, now)
