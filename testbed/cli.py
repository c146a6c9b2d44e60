"""``netkv``: the testbed's one command.

Every subcommand explains its options with ``--help``.  Bad input ends with
one line on stderr and a non-zero exit status, never a traceback; a failed
bring-up removes what it built before it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import topologies
from topologies import TopologyError

from . import cleanup, system
from .switches import vswitchd_alive
from .config import ConfigError, TestbedConfig, check_prefix, emulated_mbps

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """One-line user error."""


# -- shared options -------------------------------------------------------------
def add_testbed_options(ap: argparse.ArgumentParser) -> None:
    """One option per TestbedConfig field, named after it, with its help text."""
    group = ap.add_argument_group("testbed")
    group.add_argument("--config", type=Path, metavar="FILE",
                       help="start from a saved testbed configuration (JSON, e.g. a run's "
                            "testbed.json); options given here override it")
    for f in fields(TestbedConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = str(f.metadata.get("help", ""))
        if f.name == "params":
            group.add_argument("--param", dest="params", action="append", metavar="KEY=VALUE",
                               help=help_text + "; repeatable")
            continue
        kinds: dict[type, Callable[[str], Any]] = {bool: parse_bool, int: int, float: float, str: str}
        kind = kinds.get(type(f.default), str)
        group.add_argument(flag, dest=f.name, type=kind, default=None,
                           help=f"{help_text} (default: {f.default})")


def parse_bool(text: str) -> bool:
    """A yes/no option value: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def config_from_args(args: argparse.Namespace) -> TestbedConfig:
    cfg = TestbedConfig.load(args.config) if getattr(args, "config", None) else TestbedConfig()
    for f in fields(TestbedConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "params":
            value = {**cfg.params, **topologies.parse_params(value)}
        setattr(cfg, f.name, value)
    cfg.validate()
    return cfg


def add_prefix_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--prefix", default="nk", help="testbed instance prefix (default: %(default)s)")


class Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGHUP so that teardown runs."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def install_stop_handlers() -> None:
    """SIGTERM and SIGHUP raise Stop, and SIGINT KeyboardInterrupt, in the main
    thread, so that teardown runs.  SIGINT is set explicitly: a command started
    in the background by a non-interactive shell inherits it ignored, and Python
    then leaves it ignored, so Ctrl-C or `kill -INT` would not stop the testbed."""
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- up / down / clean / status ------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from .net import Testbed

    cfg = config_from_args(args)
    tb = Testbed(cfg)
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


def cmd_down(args: argparse.Namespace) -> int:
    prefix = check_prefix(args.prefix)
    system.require_root()
    state = cleanup.read_state(prefix) or {}
    owner = state.get("owner_pid")
    if isinstance(owner, int) and owner != os.getpid() and system.process_alive(owner) \
            and any("netkv" in p or "testbed" in p or "pytest" in p for p in system.process_cmdline(owner)):
        os.kill(owner, signal.SIGTERM)
        system.wait_until(lambda: not system.process_alive(owner), timeout_s=30, interval_s=0.2)
    left = cleanup.sweep(prefix)
    print(f"netkv: prefix {prefix}: " + ("nothing left" if left.total == 0 else f"left {left.as_dict()}"))
    return EXIT_OK if left.total == 0 else EXIT_FAIL


def cmd_clean(args: argparse.Namespace) -> int:
    prefix = check_prefix(args.prefix)
    system.require_root()
    before = cleanup.leftovers(prefix)
    left = cleanup.sweep(prefix)
    print(f"netkv: prefix {prefix}: removed {before.total - left.total} objects"
          + ("" if left.total == 0 else f"; still present: {left.as_dict()}"))
    return EXIT_OK if left.total == 0 else EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.request

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
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
                out["controller"] = json.loads(resp.read())
        except (OSError, ValueError):
            out["controller"] = None
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


# -- wiring -----------------------------------------------------------------------
Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="netkv",
        description="NetKV testbed: an emulated GPU fabric (Mininet + Open vSwitch + an os-ken "
                    "controller) that replays LLM-serving traces and moves real KV bytes over TCP "
                    "to compare decode-instance schedulers.",
        epilog="Most commands need root. Start with `netkv topo`, then `sudo netkv up --check`.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every command the testbed runs")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("up", help="bring the emulated fabric up and keep it until Ctrl-C",
                       description="Build the topology in Mininet, start the controller, shape the "
                                   "links, install routes and check that every GPU host reaches "
                                   "its peers at every tier distance. Runs in the foreground until "
                                   "Ctrl-C or `netkv down`; everything it created is then removed.")
    add_testbed_options(p)
    p.add_argument("--check", action="store_true", help="bring up, verify, report and tear down again")
    p.add_argument("--json", action="store_true", help="print the bring-up report as one JSON object")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop a running testbed and remove everything it created",
                       description="Asks the `netkv up` process of this prefix to stop, then removes "
                                   "whatever of the prefix is still there (bridges, veths, processes).")
    add_prefix_option(p)
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("clean", help="remove what a crashed testbed left behind (by its prefix)",
                       description="Removes the Open vSwitch bridges, veths and recorded processes of "
                                   "one prefix. Never touches anything else on the machine.")
    add_prefix_option(p)
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

    for module_name in ("controller.top", "testbed.experiment", "testbed.sweep", "testbed.report"):
        try:
            module = __import__(module_name, fromlist=["add_parser"])
        except ImportError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that part of the testbed is not installed in this tree
            raise
        module.add_parser(sub)
    return ap


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception classes that mean "bad input": one line, exit status 2."""
    errors: list[type[BaseException]] = [CliError, ConfigError, TopologyError, system.PreflightError]
    for module, name in (("testbed.scenario", "ScenarioError"), ("testbed.experiment", "ExperimentError"),
                         ("workers.run", "ReplayConfigError"), ("netkv.traces", "TraceError"),
                         ("netkv.placement", "PlacementError")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    USER_ERRORS = _user_errors()
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="netkv: %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"netkv: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("netkv: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (netkv ... | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    except Exception as exc:  # noqa: BLE001 - one line for the user, details in a file
        from .net import BringUpError

        if isinstance(exc, BringUpError):
            print(f"netkv: error: {exc}", file=sys.stderr)
            return EXIT_FAIL
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"netkv-error-{os.getpid()}.log"
        try:
            log.write_text(traceback.format_exc())
            where = f" (details: {log})"
        except OSError:
            where = ""
        print(f"netkv: error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
