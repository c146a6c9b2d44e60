"""The os-ken (Ryu) OpenFlow 1.3 application: a thin shim over plain logic.

* Routing: when a switch of the topology connects, its compressed route table
  from :mod:`controller.routing` is installed (after deleting any entry that
  carries this controller's cookie), followed by a barrier; the barrier reply
  marks the switch ready.  Hosts get static ARP entries from the testbed, so
  no ARP or broadcast is ever forwarded and anything unrouted is dropped by the
  table-miss behaviour of a secure-mode bridge.
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


class NetKVController(app_manager.OSKenApp):  # type: ignore[misc]
    OFP_VERSIONS = [ofproto_v1_3.OFP_VERSION]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if RUNTIME is None:
            raise RuntimeError("controller state not configured; start with python -m controller")
        self.state: ControllerState = RUNTIME
        self.datapaths: dict[int, Any] = {}
        self.poller = hub.spawn(self._poll_loop)

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
            self.state.on_connect(dp.id, time.time())
        elif ev.state == DEAD_DISPATCHER:
            self.datapaths.pop(dp.id, None)
            self.state.on_disconnect(dp.id, time.time())

    def _install_routes(self, dp: Any, name: str) -> None:
        ofp, parser = dp.ofproto, dp.ofproto_parser
        dp.send_msg(parser.OFPFlowMod(
            dp, cookie=FLOW_COOKIE, cookie_mask=0xFFFFFFFFFFFFFFFF, table_id=ofp.OFPTT_ALL,
            command=ofp.OFPFC_DELETE, out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY,
            match=parser.OFPMatch()))
        entries = self.state.routes.get(name, [])
        for entry in entries:
            fields: dict[str, Any] = {"eth_type": 0x0800, "ipv4_dst": entry.ipv4_dst}
            if entry.ipv4_src is not None:
                fields["ipv4_src"] = entry.ipv4_src
            actions = [parser.OFPActionOutput(entry.out_port)]
            inst = [parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions)]
            dp.send_msg(parser.OFPFlowMod(
                dp, cookie=FLOW_COOKIE, priority=entry.priority,
                match=parser.OFPMatch(**fields), instructions=inst))
        dp.send_msg(parser.OFPBarrierRequest(dp))
        self.state.on_routes_sent(dp.id, len(entries), time.time())

    @set_ev_cls(ofp_event.EventOFPBarrierReply, MAIN_DISPATCHER)
    def _on_barrier(self, ev: Any) -> None:
        self.state.on_routes_confirmed(ev.msg.datapath.id, time.time())

    # -- statistics -----------------------------------------------------------
    def _poll_loop(self) -> None:
        """One thread: request port statistics from every switch, then sleep.

        A failure in one round is logged loudly and the loop goes on; it never
        dies silently."""
        while True:
            try:
                for dp in list(self.datapaths.values()):
                    parser, ofp = dp.ofproto_parser, dp.ofproto
                    dp.send_msg(parser.OFPPortStatsRequest(dp, 0, ofp.OFPP_ANY))
                self.state.on_poll_sent(time.time())
            except Exception:  # noqa: BLE001 - keep polling, but loudly
                LOG.exception("statistics poll round failed")
            hub.sleep(self.state.poll_interval_s)

    @set_ev_cls(ofp_event.EventOFPPortStatsReply, MAIN_DISPATCHER)
    def _on_port_stats(self, ev: Any) -> None:
        now = time.time()
        dpid = ev.msg.datapath.id
        for stat in ev.msg.body:
            self.state.on_port_stats(
                dpid, stat.port_no, now,
                rx_bytes=stat.rx_bytes, tx_bytes=stat.tx_bytes,
                rx_packets=stat.rx_packets, tx_packets=stat.tx_packets,
                rx_dropped=stat.rx_dropped, tx_dropped=stat.tx_dropped,
                rx_errors=stat.rx_errors, tx_errors=stat.tx_errors)
