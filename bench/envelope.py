"""Envelope benchmark: what background traffic costs the emulator, per switch
process and as a whole, for each switch mode side by side in one run.

For each mode (default: shared, then per_switch) the default fabric is
brought up; for each scenario (default: none, core-hotspot, core, hotspots)
its flows are started and, over ``--seconds``, the benchmark measures:

* the CPU of every ovs-vswitchd serving the fabric (from /proc): the sum and
  the busiest single process, in % of one core;
* the machine's busy share (every core, /proc/stat) and each core's;
* the processors the switch processes ran on (sampled once a second);
* packets the switch processes received (``ovs-appctl coverage/show``,
  ``netdev_received``, summed over processes): each is one packet-hop;
* hence ``cpu_ms_per_1000_packet_hops`` = switch CPU time per thousand
  packet-hops, the emulator's cost per unit of forwarding work.

With ``--repeat N`` the modes alternate N times (shared, per_switch, shared,
...), so each repetition compares them minutes apart on the same machine:
the machine is shared and its figures move by tens of percent between runs.
The JSON (last line) has every repetition's block per mode and scenario, the
median per mode and scenario, and per scenario the shared/per_switch ratio
of the cost per packet-hop of each repetition and its median.  Targets (issue:
emulator capacity): the per_switch cost at least 4x lower than shared in the
same run, both cores used, ``hotspots`` below 60% of the machine.  Needs
root; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import controller_ports, fresh_out_dir
from fabric import system
from fabric.config import TestbedConfig
from fabric.net import Testbed
from lab import scenario
from lab.envelope import machine_ticks

COVERAGE = "netdev_received"
MODES = ("shared", "per_switch")


def coverage_total(tb: Testbed, switch: str) -> int:
    m = re.search(rf"^{COVERAGE}\s.*total:\s*(\d+)", tb.appctl(switch, "coverage/show"), re.MULTILINE)
    return int(m.group(1)) if m else 0


def packets_received(tb: Testbed) -> int:
    """Packets every switch process of the fabric has received so far."""
    if tb.per_switch:
        return sum(coverage_total(tb, sw.name) for sw in tb.topo.switches)
    return coverage_total(tb, tb.topo.switches[0].name)


def core_ticks() -> list[tuple[int, int]]:
    """(busy, total) ticks of each core."""
    out = []
    for line in Path("/proc/stat").read_text().splitlines()[1:]:
        if not re.match(r"^cpu\d+ ", line):
            break
        v = [int(x) for x in line.split()[1:9]]
        out.append((sum(v) - v[3] - v[4], sum(v)))
    return out


def last_cpu(pid: int) -> int | None:
    """The processor a process last ran on (field 39 of /proc/PID/stat)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def measure(tb: Testbed, name: str, seconds: float, log_dir: Path) -> dict[str, Any]:
    pids = tb.switch_processes()
    if not pids:
        raise RuntimeError("no switch process found for the fabric")
    scen = scenario.load(name, tb.topo)
    runner = scenario.ScenarioRunner(tb, scen, log_dir / name)
    cpus_seen: set[int] = set()
    stop = threading.Event()

    def sample_cpus() -> None:
        while not stop.wait(0.5):
            cpus_seen.update(c for c in (last_cpu(p) for p in pids.values()) if c is not None)

    runner.start()
    sampler = threading.Thread(target=sample_cpus, daemon=True)
    try:
        time.sleep(2.0 + max((f.start_s for f in scen.flows), default=0.0))
        sampler.start()
        t0, k0 = time.monotonic(), packets_received(tb)
        c0 = {n: system.cpu_ticks(p) for n, p in pids.items()}
        m0, cores0 = machine_ticks(), core_ticks()
        time.sleep(seconds)
        t1, k1 = time.monotonic(), packets_received(tb)
        c1 = {n: system.cpu_ticks(p) for n, p in pids.items()}
        m1, cores1 = machine_ticks(), core_ticks()
    finally:
        stop.set()
        runner.stop()
    dt = t1 - t0
    hz = os.sysconf("SC_CLK_TCK")
    per_proc: dict[str, float] = {}
    for n in pids:
        a, b = c0[n], c1[n]
        if a is None or b is None:
            raise RuntimeError(f"switch process {n} went away during the measurement")
        per_proc[n] = 100.0 * (b - a) / hz / dt
    total_pct = sum(per_proc.values())
    busiest = max(per_proc, key=lambda n: per_proc[n])
    hops_per_s = (k1 - k0) / dt
    return {
        "flows": len(scen.flows),
        "background_mbps_x_links": round(scen.load_mbps_hops(tb.topo, tb.config.scale), 1),
        "switch_processes": len(pids),
        "switch_cpu_sum_pct": round(total_pct, 1),
        "busiest_switch": busiest,
        "busiest_switch_cpu_pct": round(per_proc[busiest], 1),
        "machine_busy_pct": round(100.0 * (m1[0] - m0[0]) / max(1, m1[1] - m0[1]), 1),
        "core_busy_pct": [round(100.0 * (b1 - b0) / max(1, a1 - a0), 1)
                          for (b0, a0), (b1, a1) in zip(cores0, cores1)],
        "switch_cpus_used": sorted(cpus_seen),
        "packet_hops_per_s": round(hops_per_s, 1),
        "cpu_ms_per_1000_packet_hops": (round(10.0 * total_pct / hops_per_s * 1000.0, 2)
                                        if hops_per_s > 0 else None),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench envelope", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="none,core-hotspot,core,hotspots", help="comma-separated")
    ap.add_argument("--modes", default=",".join(MODES), help="switch modes to compare, comma-separated")
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring window per scenario")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the modes this many times (default 1)")
    ap.add_argument("--scale", type=float, default=None, help="testbed scale (default: the testbed's)")
    ap.add_argument("--mtu-bytes", type=int, default=None, help="MTU (default: the testbed's)")
    ap.add_argument("--jemalloc", choices=("on", "off"), default="off",
                    help="preload jemalloc into per_switch switch processes (default off, as the testbed)")
    ap.add_argument("--prefix", default="ne")
    ap.add_argument("--out", default=None, help="output directory (default runs/envelope-<time>)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}; known: {', '.join(MODES)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    out = fresh_out_dir(ap, args.out, "envelope")
    runs: list[dict[str, Any]] = []
    leftovers: list[dict[str, Any]] = []
    cfg = TestbedConfig()
    for rep in range(args.repeat):
        runs.append({})
        for mode in modes:
            of_port, rest_port = controller_ports(None, None)
            extra: dict[str, Any] = {"scale": args.scale} if args.scale else {}
            if args.mtu_bytes:
                extra["mtu_bytes"] = args.mtu_bytes
            cfg = TestbedConfig(prefix=args.prefix, of_port=of_port, rest_port=rest_port, datapath="user",
                                switch_mode=mode, switch_jemalloc=args.jemalloc == "on", **extra)
            tb = Testbed(cfg)
            runs[rep][mode] = {}
            try:
                tb.up()
                for name in names:
                    runs[rep][mode][name] = measure(tb, name, args.seconds, out / f"{rep}" / mode)
                    print(f"bench envelope: run {rep} {mode} {name}: {json.dumps(runs[rep][mode][name])}",
                          file=sys.stderr, flush=True)
            except (system.PreflightError, scenario.ScenarioError, RuntimeError) as exc:
                print(json.dumps({"bench": "envelope", "error": f"{mode}: {exc}"}))
                return 1
            finally:
                leftovers.append(tb.down().as_dict())
    key = "cpu_ms_per_1000_packet_hops"
    medians = {mode: {name: {k: _median([r[mode][name][k] for r in runs])
                             for k in ("switch_cpu_sum_pct", "busiest_switch_cpu_pct", "machine_busy_pct",
                                       "packet_hops_per_s", key)}
                      for name in names} for mode in modes}
    ratios: dict[str, Any] = {}
    if "shared" in modes and "per_switch" in modes:
        for name in names:
            each = [round(r["shared"][name][key] / r["per_switch"][name][key], 2)
                    for r in runs if r["shared"][name][key] and r["per_switch"][name][key]]
            ratios[name] = {"each": each, "median": _median(each)}
    targets: dict[str, Any] = {}
    loaded = [n for n in names if n != "none"]
    if ratios:
        targets["cost_per_packet_hop_4x_lower"] = all((ratios[n]["median"] or 0) >= 4.0 for n in loaded)
    if "per_switch" in modes:
        # both cores: each core carried at least a third of the machine's busy time
        targets["both_cores_used"] = all(min(r["per_switch"][n]["core_busy_pct"])
                                         >= max(r["per_switch"][n]["core_busy_pct"]) / 2
                                         for r in runs for n in loaded)
        if "hotspots" in names:
            targets["hotspots_below_60pct_of_machine"] = \
                (medians["per_switch"]["hotspots"]["machine_busy_pct"] or 100.0) < 60.0
    print(json.dumps({"bench": "envelope", "topology": cfg.topology, "scale": cfg.scale,
                      "mtu_bytes": cfg.mtu_bytes, "jemalloc": args.jemalloc, "seconds": args.seconds,
                      "repeat": args.repeat, "load_avg_1min": os.getloadavg()[0], "runs": runs,
                      "median": medians, "shared_over_per_switch_cost": ratios, "targets": targets,
                      "leftovers_total": sum(int(x["total"]) for x in leftovers)}))
    return 0


def _median(values: list[Any]) -> float | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return float(vals[mid]) if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2.0


if __name__ == "__main__":
    sys.exit(main())
