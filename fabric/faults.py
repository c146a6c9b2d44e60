"""Faults applied to a running fabric's links and switches, and what follows
them: the controller told of a re-rated link, a switch or controller started
again, on a running :class:`fabric.net.Testbed`.  The experiments' fault events
(:mod:`lab.faults`) call these at their times."""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from fabric import shaping, switches, system
from fabric.config import emulated_mbps
from fabric.system import BringUpError

if TYPE_CHECKING:
    from fabric.net import Testbed


def _at_end(tb: "Testbed", node: str, argv: list[str]) -> list[str]:
    """argv run where one end of a link is: a GPU host's namespace, or the switch's."""
    return tb.in_host(node, argv) if tb.topo.node(node).is_gpu else tb.in_switch(node, argv)


def set_link_state(tb: "Testbed", a: str, b: str, up: bool) -> None:
    """Set both ends of the link a-b administratively up or down.  A GPU
    host's end gets its addresses, neighbours and route back when it comes up."""
    link = tb.topo.link_between(a, b)
    for node in (link.a, link.b):
        ifname = tb.intf(node, link.port_of(node))
        if up and tb.topo.node(node).is_gpu:
            system.run(tb.in_host(node, ["ip", "-batch", "-"]),
                       input_text="\n".join(tb.host_ip_lines(node, [ifname])) + "\n")
        else:
            system.run(_at_end(tb, node, ["ip", "link", "set", "dev", ifname, "up" if up else "down"]))


def rerate_link(tb: "Testbed", a: str, b: str, rate_gbps: float) -> float | None:
    """Change the htb rate of both ends of the link a-b (real Gbit/s) and
    tell the controller, as an operator's configuration would (its
    utilisation and /oracle then use the new rate).  Returns the rate the
    controller acknowledged, None if it is down (told when it is back)."""
    link = tb.topo.link_between(a, b)
    mbps = emulated_mbps(rate_gbps, tb.config.scale)
    for node in (link.a, link.b):
        line = shaping.tc_class_line(tb.intf(node, link.port_of(node)), mbps, tb.config.mtu_bytes)
        system.run(_at_end(tb, node, ["tc", "-batch", "-"]), input_text=line + "\n")
    if rate_gbps == link.rate_gbps:
        tb.link_rates_gbps.pop(link.key, None)
    else:
        tb.link_rates_gbps[link.key] = float(rate_gbps)
    return tb.tell_controller_rate(link.key, rate_gbps)


def kill_controller(tb: "Testbed") -> int:
    """SIGKILL the controller by its pid (the switches keep their routes:
    fail-secure mode); returns the pid."""
    if tb.controller is None:
        raise BringUpError("no controller is running")
    pid = tb.controller.pid
    tb.controller.kill()
    tb.controller.wait(timeout=10)
    return pid


def start_controller_again(tb: "Testbed") -> dict[str, Any]:
    """Start the controller again (same ports and options) and wait until
    every switch has reconnected and confirmed its routes."""
    tb.start_controller()
    api_up = time.time()
    tb.wait_routes()
    assert tb.controller is not None
    return {"pid": tb.controller.pid, "api_up_s": api_up, "routes_ready_s": time.time()}


def kill_switch(tb: "Testbed", name: str) -> list[int]:
    """Take one switch away at once.  One process per switch: SIGKILL its
    ovs-vswitchd and ovsdb-server by their pids, and return them.  Shared
    Open vSwitch: delete its bridge (the links' interfaces stay), and
    return no pid."""
    if not tb.per_switch:
        system.run(switches.shared_bridge_del_argv(tb.mn_name(name)))
        return []
    p = tb.switch_paths(name)
    pids = [pid for pid in (tb.switch_pids.pop(name, None), switches.read_pid(p.ovsdb_pidfile))
            if pid is not None]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    system.wait_until(lambda: not any(system.process_alive(pid) for pid in pids), timeout_s=10)
    tb.write_state()
    return pids


def start_switch_again(tb: "Testbed", name: str) -> dict[str, Any]:
    """Start one switch's ovsdb-server (on its database as it was) and
    ovs-vswitchd again, or, with the shared Open vSwitch, add its bridge
    again as bring-up described it and shape its ends again; waits until
    the controller has its routes installed."""
    if not tb.per_switch:
        return _add_shared_bridge_again(tb, name)
    p = tb.switch_paths(name)
    env = switches.daemon_env(p, jemalloc=tb.config.switch_jemalloc)
    system.run(switches.ovsdb_server_argv(p), env=env)
    system.run(switches.vswitchd_argv(p, switches.netns_name(tb.prefix, name)), env=env)
    pid = switches.read_pid(p.vswitchd_pidfile)
    if pid is None:
        raise BringUpError(f"ovs-vswitchd of {name} wrote no pid file (log: {p.log('ovs-vswitchd')})")
    tb.switch_pids[name] = pid
    tb.write_state()
    time.sleep(0.2)  # let the controller see the old connection go before asking whether it is ready
    tb.wait_routes()
    return {"pid": pid, "routes_ready_s": time.time()}


def _add_shared_bridge_again(tb: "Testbed", name: str) -> dict[str, Any]:
    sw = tb.topo.node(name)
    target = f"tcp:127.0.0.1:{tb.config.of_port}"
    datapath_type = "netdev" if tb.datapath == "user" else "system"
    system.run(switches.shared_bridge_add_argv(tb.mn_name(name), sw.dpid, tb.switch_ports(name), target,
                                               datapath_type))
    # the ports' queues start empty, at each link's rate now (re-rated links included)
    lines = []
    for link in tb.topo.links_of(name):
        mbps = emulated_mbps(tb.link_rates_gbps.get(link.key, link.rate_gbps), tb.config.scale)
        lines += shaping.tc_batch_lines(tb.intf(name, link.port_of(name)), mbps, tb.config.mtu_bytes,
                                        tb.config.queue_packets, tb.config.link_delay_ms)
    system.run(["tc", "-batch", "-"], input_text="\n".join(lines) + "\n")
    time.sleep(0.2)  # let the controller see the old connection go before asking whether it is ready
    tb.wait_routes()
    return {"pid": None, "routes_ready_s": time.time()}


def shared_bridge_exists(tb: "Testbed", name: str) -> bool:
    return system.run(["ovs-vsctl", "--timeout=10", "br-exists", tb.mn_name(name)], check=False).returncode == 0


def ensure_running(tb: "Testbed") -> dict[str, Any]:
    """Start the controller and any switch process that is not running."""
    out: dict[str, Any] = {}
    if tb.controller is None or tb.controller.poll() is not None:
        out["controller_started"] = start_controller_again(tb)["pid"]
    if tb.per_switch:
        dead = [sw.name for sw in tb.topo.switches
                if not switches.vswitchd_alive(tb.switch_pids.get(sw.name))]
        for name in dead:
            kill_switch(tb, name)  # its ovsdb-server too, if it is still there
            out.setdefault("switches_started", {})[name] = start_switch_again(tb, name)["pid"]
    else:
        for name in [sw.name for sw in tb.topo.switches if not shared_bridge_exists(tb, sw.name)]:
            start_switch_again(tb, name)
            out.setdefault("bridges_added", []).append(name)
    tb.wait_routes()
    return out
