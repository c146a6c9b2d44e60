"""``netkv up``, ``down``, ``clean``, ``status`` and ``topo``: the emulated fabric."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from functools import partial
from typing import Any, Callable

import topologies
from controller.client import ControllerClient, loopback_url
from fabric import cleanup, cluster, remote, system
from fabric.config import TestbedConfig, check_prefix, emulated_mbps
from fabric.net import Testbed
from fabric.switches import vswitchd_alive
from fabric.system import PreflightError

from .common import (
    EXIT_FAIL,
    EXIT_OK,
    CliError,
    Stop,
    add_prefix_option,
    add_testbed_options,
    config_from_args,
    install_stop_handlers,
)


# -- up / down / clean / status ------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if len(cfg.server_list()) > 1:
        return cluster_up(cfg, args)
    return run_up(Testbed(cfg), args)


def run_up(tb: Testbed, args: argparse.Namespace) -> int:
    """Bring ``tb`` up, report, and keep it until stopped (or, with --check,
    tear it down at once)."""
    cfg = tb.config
    install_stop_handlers()
    try:
        if not args.json:
            print(f"netkv: bringing up {tb.topo.name}: {len(tb.topo.gpus)} GPUs, "
                  f"{len(tb.topo.switches)} switches, {len(tb.topo.links)} links, "
                  f"scale 1:{cfg.scale:g} (prefix {cfg.prefix})", flush=True)
        report = tb.up()
        out = report.as_dict()
        if args.json:
            print(json.dumps(out))
        else:
            print(f"netkv: up in {report.up_s:.1f} s on the {report.datapath} datapath; "
                  f"{report.pings_ok}/{report.pings_total} GPU pairs reachable "
                  f"(by tier distance {dict(sorted(report.pings_by_tier.items()))}) in {report.verify_s:.1f} s")
            print(f"netkv: controller API {tb.rest_url}  (try: netkv status, netkv telemetry)")
            print(f"netkv: live fabric view {tb.rest_url}/  (a browser on this machine)")
        if args.check:
            return EXIT_OK
        if not args.json:
            print("netkv: running; Ctrl-C (or `netkv down`) stops it and removes everything", flush=True)
        reported: set[str] = set()
        while True:
            if tb.controller is not None and tb.controller.poll() is not None:
                raise CliError(f"the controller exited; see {tb.run_dir / 'controller.log'}")
            for name in tb.dead_switches():
                if name not in reported:
                    reported.add(name)
                    print(f"netkv: the switch process of {name} (pid {tb.switch_pids[name]}) is gone: nothing "
                          f"is forwarded through {name} (log: {tb.switch_paths(name).log('ovs-vswitchd')})",
                          file=sys.stderr, flush=True)
            for server, relay in tb.relays.items():
                if relay.poll() is not None and server not in reported:
                    reported.add(server)
                    print(f"netkv: the OpenFlow relay on {server} is gone: its switches lost the controller "
                          f"(log: {tb.run_dir / f'relay-{server}.log'})", file=sys.stderr, flush=True)
            time.sleep(1.0)
    except (KeyboardInterrupt, Stop):
        return EXIT_OK
    finally:
        t0 = time.monotonic()
        owned = tb.owns_prefix
        left = tb.down()
        if owned and not args.json:
            state = "clean" if left.total == 0 else f"LEFTOVERS {left.as_dict()}"
            print(f"netkv: torn down in {time.monotonic() - t0:.1f} s, {state}", file=sys.stderr)


def cluster_up(cfg: TestbedConfig, args: argparse.Namespace,
               check: Callable[[list[cluster.Server]], cluster.ClusterCheck] = partial(cluster.check_servers,
                                                                                       bound_s=None),
               build: Callable[[Testbed, argparse.Namespace], int] = run_up) -> int:
    """``netkv up --servers`` with more than one server: the placement and the
    crossing links (already checked by ``validate``), the preflight of every
    server, then the bring-up through Mininet Cluster Edition (``build``)."""
    topo = cfg.validate()
    servers = cfg.server_list()
    plan = cfg.cluster_plan(topo)
    assert plan is not None  # more than one server
    if not args.json:
        for row in plan.placement.summary(topo):
            print(f"netkv: {row['server']} ({row['address']}, {row['role']}): pods {row['pods'] or '-'}, "
                  f"{row['gpus']} GPU hosts, {row['switches']} switches", flush=True)
        print(f"netkv: {len(plan.crossing)} links cross machines, each a gretap tunnel of MTU {cfg.mtu_bytes} "
              f"(+{cluster.GRETAP_OVERHEAD_BYTES} bytes on the management network) shaped at both ends", flush=True)
        for c in plan.crossing:
            print(f"netkv:   {c.lower}-{c.upper}: {c.tunnel}, {c.rate_mbps:g} Mbit/s", flush=True)
        print(f"netkv: checking {len(servers)} servers (ssh as root, commit, Open vSwitch, clock offset)",
              flush=True)
    result = check(servers)
    if not args.json:
        for s in result.servers:
            clock = (f"clock {s.clock.offset_s * 1e3:+.3f} ms +-{s.clock.uncertainty_s * 1e3:.3f} ms"
                     if s.clock else "clock -")
            print(f"netkv: {s.server.label} {s.server.role}: {'ok' if not s.problems else 'NOT READY'}; "
                  f"commit {s.commit[:12] or '-'}; {s.ovs_version or 'no Open vSwitch'}; {clock}", flush=True)
    if not result.ok:
        raise PreflightError(result.problem_line())
    return build(Testbed(cfg, server_check=result), args)


def cmd_down(args: argparse.Namespace) -> int:
    prefix = check_prefix(args.prefix)
    system.require_root()
    state = cleanup.read_state(prefix) or {}
    owner = state.get("owner_pid")
    if isinstance(owner, int) and owner != os.getpid() and system.process_alive(owner) \
            and any("netkv" in p or "testbed" in p or "pytest" in p for p in system.process_cmdline(owner)):
        os.kill(owner, signal.SIGTERM)
        system.wait_until(lambda: not system.process_alive(owner), timeout_s=30, interval_s=0.2)
    left = sweep_everywhere(prefix, remote.workers_of_state(state))
    print(f"netkv: prefix {prefix}: " + ("nothing left" if left.total == 0 else f"left {left.as_dict()}"))
    return EXIT_OK if left.total == 0 else EXIT_FAIL


def sweep_everywhere(prefix: str, workers: list[cluster.Server]) -> cleanup.Leftovers:
    """The prefix's sweep on every other server of its testbed (over ssh, each
    by its own `netkv clean`), then on this machine."""
    remote_left = remote.sweep_workers(prefix, workers, cleanup.state_dir(prefix)) if workers else {}
    left = cleanup.sweep(prefix)
    left.servers.update(remote_left)
    return left


def cmd_clean(args: argparse.Namespace) -> int:
    prefix = check_prefix(args.prefix)
    system.require_root()
    before = cleanup.leftovers(prefix)
    workers = remote.workers_of_state(cleanup.read_state(prefix))
    if getattr(args, "servers", None):
        try:
            workers = cluster.parse_servers(args.servers)[1:]
        except cluster.ClusterError as exc:
            raise CliError(str(exc)) from None
    left = sweep_everywhere(prefix, workers)
    print(f"netkv: prefix {prefix}: removed {before.total - left.total} objects"
          + ("" if left.total == 0 else f"; still present: {left.as_dict()}"))
    return EXIT_OK if left.total == 0 else EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    prefix = check_prefix(args.prefix)
    state = cleanup.read_state(prefix)
    out: dict[str, Any] = {"prefix": prefix, "up": False}
    if state:
        owner = state.get("owner_pid")
        out["owner_pid"] = owner
        out["owner_alive"] = isinstance(owner, int) and system.process_alive(owner)
        out["datapath"] = state.get("datapath")
        out["switch_mode"] = state.get("switch_mode")
        pids = state.get("switch_pids")
        if isinstance(pids, dict):
            out["switch_processes"] = len(pids)
            out["switch_processes_dead"] = sorted(n for n, pid in pids.items() if not vswitchd_alive(pid))
        out["config"] = state.get("config")
        port = state.get("rest_port")
        out["controller"] = ControllerClient(loopback_url(int(port))).get("/status") \
            if isinstance(port, int) else None
        out["up"] = bool(out["owner_alive"] and out["controller"] and out["controller"].get("ready")
                         and not out.get("switch_processes_dead"))
    if os.geteuid() == 0:
        out["leftovers_or_live"] = cleanup.leftovers(prefix).as_dict()
    if args.json:
        print(json.dumps(out))
    elif not state:
        print(f"netkv: no testbed with prefix {prefix} is recorded on this machine")
    else:
        ctl = out.get("controller") or {}
        print(f"netkv: prefix {prefix}: {'UP' if out['up'] else 'NOT UP'}; owner pid {out.get('owner_pid')} "
              f"{'alive' if out.get('owner_alive') else 'gone'}; datapath {out.get('datapath')}"
              f" ({out.get('switch_mode')} switch processes"
              + (f", {len(out['switch_processes_dead'])} of {out['switch_processes']} GONE: "
                 f"{', '.join(out['switch_processes_dead'])}" if out.get("switch_processes_dead") else "")
              + "); "
              f"controller {'answers' if ctl else 'does not answer'}"
              + (f" ({ctl.get('switches_ready')}/{ctl.get('switches_expected')} switches ready, "
                 f"{ctl.get('flow_entries')} flow entries)" if ctl else ""))
    return EXIT_OK if out["up"] else EXIT_FAIL


def cmd_topo(args: argparse.Namespace) -> int:
    if args.help_params:
        for name in topologies.names():
            print(f"{name}: {topologies.BUILDERS[name][2]}")
            print(topologies.describe_params(name))
        return EXIT_OK
    topo = topologies.build(args.topology or topologies.DEFAULT_TOPOLOGY,
                            topologies.parse_params(args.params))
    scale = args.scale if args.scale is not None else TestbedConfig().scale
    if args.path:
        src, dst = args.path
        for name in (src, dst):
            if name not in topo.nodes or not topo.node(name).is_gpu:
                raise CliError(f"unknown GPU host {name!r} (hosts are g0..g{len(topo.gpus) - 1})")
        if src == dst:
            raise CliError("--path needs two different GPU hosts")
        info = {"src": src, "dst": dst, "nodes": topo.path(src, dst),
                "equal_cost_paths": len(topo.shortest_paths(src, dst)),
                "tier_distance": topo.tier_distance(src, dst),
                "bottleneck_gbps": topo.bottleneck_gbps(src, dst)}
        print(json.dumps(info) if args.json else
              f"{src} -> {dst}: {' - '.join(info['nodes'])}  (tier distance {info['tier_distance']}, "
              f"{info['equal_cost_paths']} equal-cost paths, bottleneck {info['bottleneck_gbps']:g} Gbit/s)")
        return EXIT_OK
    summary = topo.summary()
    if args.json:
        print(json.dumps(summary))
        return EXIT_OK
    print(f"{topo.name}: {summary['gpus']} GPUs, {summary['switches']} switches, {summary['links']} links")
    for tier, name in topologies.TIER_NAMES.items():
        links = [l for l in topo.links if l.tier == tier]
        if not links:
            continue
        rates = sorted({l.rate_gbps for l in links})
        print(f"  tier {tier} {name:22s} switches {topo.count_by_tier().get(tier, 0):3d}  links {len(links):3d}  "
              f"rate {', '.join(f'{r:g}' for r in rates)} Gbit/s real = "
              f"{', '.join(f'{emulated_mbps(r, scale):g}' for r in rates)} Mbit/s emulated at 1:{scale:g}")
    print(f"  oversubscription by switch tier: {summary['oversubscription_by_tier']}")
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("up", help="bring the emulated fabric up and keep it until Ctrl-C",
                       description="Build the topology in Mininet, start the controller, shape the "
                                   "links, install routes and check that every GPU host reaches "
                                   "its peers at every tier distance. Runs in the foreground until "
                                   "Ctrl-C or `netkv down`; everything it created is then removed.")
    add_testbed_options(p)
    p.add_argument("--check", action="store_true", help="bring up, verify, report and tear down again (with "
                   "--servers: every server is checked first, then the fabric is built across them)")
    p.add_argument("--json", action="store_true", help="print the bring-up report as one JSON object")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop a running testbed and remove everything it created",
                       description="Asks the `netkv up` process of this prefix to stop, then removes "
                                   "whatever of the prefix is still there (bridges, veths, processes).")
    add_prefix_option(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("clean", help="remove what a crashed testbed left behind (by its prefix)",
                       description="Removes the Open vSwitch bridges, veths and recorded processes of "
                                   "one prefix. Never touches anything else on the machine. A testbed on "
                                   "several servers is swept on each of them too (over ssh, by their own "
                                   "`netkv clean`): the servers recorded by its bring-up, or --servers.")
    add_prefix_option(p)
    p.add_argument("--servers", metavar="NAME=IPV4,...",
                   help="sweep the prefix on these servers too (the head first, as `netkv up --servers` took "
                        "them); default: the servers its bring-up recorded on this machine, if any")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("status", help="is a testbed up? what does its controller report?")
    add_prefix_option(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("topo", help="describe a topology (no root needed)",
                       description="Print a topology's switches and links per tier, their real and "
                                   "emulated rates, oversubscription, or the path of one GPU pair.")
    p.add_argument("--topology", choices=topologies.names(), help="default: fattree")
    p.add_argument("--param", dest="params", action="append", metavar="KEY=VALUE",
                   help="topology parameter, repeatable")
    p.add_argument("--scale", type=float, help="scale factor for the emulated rates shown")
    p.add_argument("--path", nargs=2, metavar=("SRC", "DST"), help="show the routed path of a GPU pair")
    p.add_argument("--help-params", action="store_true", help="list every topology's parameters")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_topo)
