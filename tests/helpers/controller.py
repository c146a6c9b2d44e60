"""A controller state with every hop of the tiny topology measured."""

from __future__ import annotations

import topologies
from controller.state import ControllerState, QueueSample

SCALE = 20_000.0
NOW = 1000.0


def loaded_state() -> ControllerState:
    """tiny topology, every hop measured at t=NOW-0.2; t0->a1 carries 9 of its
    10 emulated Mbit/s, everything else idle."""
    state = ControllerState(topologies.build("tiny"), scale=SCALE, prefix="nc")
    topo = state.topo
    busy = ("t0", "a1")
    for sw in topo.switches:
        for link in topo.links_of(sw.name):
            port = link.port_of(sw.name)
            nb = link.other(sw.name)
            rx = 9e6 / 8 * 0.5 if (nb, sw.name) == busy else 0
            state.on_port_stats(sw.dpid, port, NOW - 0.7, rx_bytes=0, tx_bytes=0, rx_packets=0, tx_packets=0,
                                rx_dropped=0, tx_dropped=0, rx_errors=0, tx_errors=0)
            state.on_port_stats(sw.dpid, port, NOW - 0.2, rx_bytes=int(rx), tx_bytes=0, rx_packets=0,
                                tx_packets=0, rx_dropped=0, tx_dropped=0, rx_errors=0, tx_errors=0)
    state.on_queue_stats([QueueSample(f"nct0-eth{topo.port_to('t0', 'a1')}", NOW - 0.1, "htb", 9000, 6, 3, 0, 0)],
                         NOW - 0.1)
    return state
