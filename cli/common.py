"""What every group of ``netkv`` subcommands shares: the one-line user error,
the testbed options (one per :class:`fabric.config.TestbedConfig` field), and
the signal handlers that let teardown run."""

from __future__ import annotations

import argparse
import signal
from dataclasses import fields
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import topologies
from fabric import cluster
from fabric.config import TestbedConfig

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
        if f.name == "servers":
            group.add_argument("--servers", dest="servers", default=None, metavar="NAME=IPV4,...",
                               help=help_text + " (default: this machine alone)")
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
        elif f.name == "servers" and isinstance(value, str):  # from the command line; else a saved section
            value = cluster.servers_to_json(cluster.parse_servers(value))
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
