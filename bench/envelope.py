"""Envelope benchmark: what background traffic costs the userspace switch.

For each scenario (default: none, core-hotspot, core, hotspots) on the default
fabric: bring it up, start the scenario's flows, and over ``--seconds`` measure
ovs-vswitchd's CPU (% of one core, from /proc) and, from
``ovs-appctl coverage/show``, how many packets it received and how many poll
nodes it created per second (every wake-up of its main thread polls every
port, so poll nodes / ports is its wake-up rate).  Prints one JSON object as
the last line: per scenario ``switch_cpu_pct``, ``packets_per_s``,
``poll_nodes_per_s``, ``wakeups_per_s`` and the background load in emulated
Mbit/s x links.  Needs root; nothing else should run on the machine meanwhile
(the process serves every bridge on it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from testbed import scenario, system
from testbed.config import TestbedConfig
from testbed.experiment import OVS_PIDFILE
from testbed.net import Testbed

COUNTERS = ("poll_create_node", "netdev_received")


def coverage_totals() -> dict[str, int]:
    out = system.run(["ovs-appctl", "coverage/show"], check=False).stdout
    totals = {}
    for name in COUNTERS:
        m = re.search(rf"^{name}\s.*total:\s*(\d+)", out, re.MULTILINE)
        totals[name] = int(m.group(1)) if m else 0
    return totals


def measure(tb: Testbed, name: str, seconds: float, log_dir: Path) -> dict[str, Any]:
    pid = int(OVS_PIDFILE.read_text().strip())
    scen = scenario.load(name, tb.topo)
    runner = scenario.ScenarioRunner(tb, scen, log_dir / name)
    runner.start()
    try:
        time.sleep(2.0 + max((f.start_s for f in scen.flows), default=0.0))
        t0, c0, k0 = time.monotonic(), system.cpu_ticks(pid), coverage_totals()
        time.sleep(seconds)
        t1, c1, k1 = time.monotonic(), system.cpu_ticks(pid), coverage_totals()
    finally:
        runner.stop()
    if c0 is None or c1 is None:
        raise RuntimeError("ovs-vswitchd went away during the measurement")
    ports = sum(1 for _ in tb.topo.links) * 2 - len(tb.topo.gpus) + len(tb.topo.switches)
    dt = t1 - t0
    poll = (k1["poll_create_node"] - k0["poll_create_node"]) / dt
    return {
        "flows": len(scen.flows),
        "background_mbps_x_links": round(scen.load_mbps_hops(tb.topo, tb.config.scale), 1),
        "switch_cpu_pct": round(100.0 * (c1 - c0) / os.sysconf("SC_CLK_TCK") / dt, 1),
        "packets_per_s": round((k1["netdev_received"] - k0["netdev_received"]) / dt, 1),
        "poll_nodes_per_s": round(poll, 1),
        "switch_ports": ports,
        "wakeups_per_s": round(poll / ports, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench envelope", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="none,core-hotspot,core,hotspots", help="comma-separated")
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring window per scenario")
    ap.add_argument("--scale", type=float, default=None, help="testbed scale (default: the testbed's)")
    ap.add_argument("--mtu-bytes", type=int, default=1500)
    ap.add_argument("--prefix", default="ne")
    ap.add_argument("--out", type=Path, default=Path("/tmp/netkv-bench-envelope"))
    args = ap.parse_args(argv)
    cfg = TestbedConfig(prefix=args.prefix, of_port=16634, rest_port=18089, mtu_bytes=args.mtu_bytes,
                        **({"scale": args.scale} if args.scale else {}))
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    tb = Testbed(cfg)
    results: dict[str, Any] = {}
    try:
        tb.up()
        for name in names:
            results[name] = measure(tb, name, args.seconds, args.out)
    except (system.PreflightError, scenario.ScenarioError, RuntimeError) as exc:
        print(json.dumps({"bench": "envelope", "error": str(exc)}))
        return 1
    finally:
        left = tb.down()
    print(json.dumps({"bench": "envelope", "topology": tb.topo.name, "scale": cfg.scale,
                      "mtu_bytes": cfg.mtu_bytes, "datapath": tb.report.datapath,
                      "load_avg_1min": os.getloadavg()[0], "scenarios": results,
                      "leftovers": left.as_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
