"""One Open vSwitch instance per emulated switch (the ``per_switch`` mode).

Why: on the userspace datapath, ``ovs-vswitchd``'s main thread tries every
non-PMD port of every bridge it serves at each wake-up, idle ports included,
so one shared process pays for all ~130 switch ports of the default fat-tree
on every packet of every hop, and it cannot use the second core
(docs/design.md, "One process per switch").  Here every switch is:

* a Mininet node in its own network namespace (its veth ends live there),
  attached under the name ``<prefix><switch>`` (``ip netns list`` shows it,
  ``ip netns exec nkt1 tc -s qdisc`` inspects it);
* its own ``ovsdb-server`` and ``ovs-vswitchd`` (a userspace datapath makes a
  kernel tap named ``ovs-netdev``, so two instances cannot share a namespace),
  with database, pid files, control sockets and logs in
  ``/run/netkv/<prefix>/sw/<switch>/``;
* connected to the controller through the Unix socket
  ``/run/netkv/<prefix>/sw/of.sock`` (a process inside a namespace cannot
  reach the root namespace's 127.0.0.1; a Unix socket in the filesystem
  crosses namespaces, and the controller relays it to its loopback OpenFlow
  listener).  Open vSwitch connects only to sockets in its run directory, so
  every instance of a testbed shares the run directory ``sw/``, where the
  bridges' OpenFlow management sockets ``<bridge>.mgmt`` are too.

Everything here builds argv lists and paths; :mod:`fabric.net` runs them.
The sweep (:mod:`fabric.cleanup`) finds the daemons by the instance's own
directory in their command line, the namespaces by their exact names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fabric.system import process_alive, process_cmdline

OVS_SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
SWITCH_BINARIES = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-appctl")
# jemalloc for the switch processes (TestbedConfig.switch_jemalloc): the
# userspace datapath allocates and frees a batch of packet buffers per port per
# wake-up (a fifth of its CPU samples are in malloc/free, perf); preloading jemalloc
# made no measurable difference here (docs/design.md), so it is optional.
JEMALLOC_PATHS = (Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
                  Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"))
# Seconds between a lost controller connection and the next attempt, at most
# (Open vSwitch's default is 8 s); a restarted controller is found quickly.
CONTROLLER_MAX_BACKOFF_MS = 1000
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL

MODES = ("auto", "per_switch", "shared")


@dataclass(frozen=True)
class SwitchPaths:
    """Where one switch instance keeps its files (all under the testbed's state dir)."""

    root: Path  # the instance's own directory
    rundir: Path  # OVS_RUNDIR, shared by the testbed's instances

    @property
    def db(self) -> Path:
        return self.root / "conf.db"

    @property
    def db_sock(self) -> Path:
        return self.root / "db.sock"

    @property
    def ovsdb_pidfile(self) -> Path:
        return self.root / "ovsdb-server.pid"

    @property
    def ovsdb_ctl(self) -> Path:
        return self.root / "ovsdb-server.ctl"

    @property
    def vswitchd_pidfile(self) -> Path:
        return self.root / "ovs-vswitchd.pid"

    @property
    def vswitchd_ctl(self) -> Path:
        return self.root / "ovs-vswitchd.ctl"

    def mgmt(self, bridge: str) -> Path:
        """The bridge's OpenFlow management socket (ovs-ofctl talks to it)."""
        return self.rundir / f"{bridge}.mgmt"

    def log(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"


def resolve_mode(requested: str, datapath: str) -> str:
    """'per_switch' or 'shared' for a requested mode on a datapath ('kernel' | 'user').

    The kernel datapath forwards in the kernel: one shared instance costs
    nothing per packet there, so ``auto`` keeps it; on the userspace datapath
    ``auto`` is one instance per switch."""
    if requested not in MODES:
        raise ValueError(f"switch_mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "auto":
        return "per_switch" if datapath == "user" else "shared"
    return requested


def switches_root(state_dir: Path) -> Path:
    return state_dir / "sw"


def paths_of(state_dir: Path, switch: str) -> SwitchPaths:
    return SwitchPaths(switches_root(state_dir) / switch, switches_root(state_dir))


def controller_socket(state_dir: Path) -> Path:
    return switches_root(state_dir) / "of.sock"


def check_socket_paths(state_dir: Path, bridge_names: Sequence[str]) -> None:
    """Unix socket paths are limited to 107 bytes: refuse a state dir too deep."""
    longest = max((str(paths_of(state_dir, b).mgmt(b)) for b in bridge_names), key=len, default="")
    for path in (longest, str(controller_socket(state_dir))):
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                             f"use a shorter NETKV_STATE_ROOT")


def netns_name(prefix: str, switch: str) -> str:
    """The name under which a switch's namespace is attached (``ip netns``)."""
    return prefix + switch


def ovsdb_create_argv(p: SwitchPaths) -> list[str]:
    return ["ovsdb-tool", "create", str(p.db), str(OVS_SCHEMA)]


def ovsdb_server_argv(p: SwitchPaths) -> list[str]:
    return ["ovsdb-server", str(p.db), f"--remote=punix:{p.db_sock}", f"--pidfile={p.ovsdb_pidfile}",
            f"--unixctl={p.ovsdb_ctl}", "--detach", "--no-chdir", f"--log-file={p.log('ovsdb-server')}",
            "-vconsole:off"]


def vsctl_argv(p: SwitchPaths, *args: str) -> list[str]:
    return ["ovs-vsctl", f"--db=unix:{p.db_sock}", "--timeout=20", *args]


def bridge_txn(bridge: str, dpid: int, ports: Sequence[tuple[str, int]], controller_target: str,
               datapath_type: str = "netdev") -> list[str]:
    """The ovs-vsctl commands that add one switch's bridge: its datapath,
    OpenFlow settings, ports (``ports``: (interface name, OpenFlow port
    number) pairs) and controller."""
    txn: list[str] = ["--", "add-br", bridge,
                      "--", "set", "bridge", bridge, f"datapath_type={datapath_type}", "fail_mode=secure",
                      "protocols=OpenFlow13", f"other-config:datapath-id={dpid:016x}",
                      "other-config:disable-in-band=true"]
    for ifname, ofport in ports:
        txn += ["--", "add-port", bridge, ifname, "--", "set", "interface", ifname, f"ofport_request={ofport}"]
    txn += ["--", "--id=@c", "create", "controller", f"target=\"{controller_target}\"",
            f"max_backoff={CONTROLLER_MAX_BACKOFF_MS}",
            "--", "set", "bridge", bridge, "controller=@c"]
    return txn


def bridge_config_argv(p: SwitchPaths, bridge: str, dpid: int, ports: Sequence[tuple[str, int]],
                       controller_target: str) -> list[str]:
    """One ovs-vsctl transaction that describes the whole switch before its
    ovs-vswitchd starts (it then configures everything in one pass)."""
    return vsctl_argv(p, "--no-wait", "--", "init", *bridge_txn(bridge, dpid, ports, controller_target))


def shared_bridge_add_argv(bridge: str, dpid: int, ports: Sequence[tuple[str, int]], controller_target: str,
                           datapath_type: str) -> list[str]:
    """Add one switch's bridge again to the machine's shared Open vSwitch (a
    switch_restart with switch_mode shared), in one transaction; ovs-vsctl
    waits until ovs-vswitchd has applied it."""
    return ["ovs-vsctl", "--timeout=20", *bridge_txn(bridge, dpid, ports, controller_target, datapath_type)]


def shared_bridge_del_argv(bridge: str) -> list[str]:
    """Delete one switch's bridge from the shared Open vSwitch (its ports'
    interfaces stay: they are the links' veth ends)."""
    return ["ovs-vsctl", "--timeout=20", "--if-exists", "del-br", bridge]


def vswitchd_argv(p: SwitchPaths, netns: str) -> list[str]:
    """ovs-vswitchd inside the switch's namespace.  ``ip netns exec`` (not a
    bare setns) also gives it a /sys of that namespace, which netdev-linux reads."""
    return ["ip", "netns", "exec", netns, "ovs-vswitchd", f"unix:{p.db_sock}",
            f"--pidfile={p.vswitchd_pidfile}", f"--unixctl={p.vswitchd_ctl}", "--detach", "--no-chdir",
            f"--log-file={p.log('ovs-vswitchd')}", "-vconsole:off"]


def jemalloc_path() -> Path | None:
    return next((p for p in JEMALLOC_PATHS if p.exists()), None)


def daemon_vars(p: SwitchPaths, *, jemalloc: bool) -> dict[str, str]:
    """The variables a switch's daemons get on top of their environment:
    every run/db/log directory Open vSwitch would default to points into the
    testbed's own directories (and jemalloc preloaded when asked for)."""
    own = {"OVS_RUNDIR": str(p.rundir), "OVS_DBDIR": str(p.root), "OVS_LOGDIR": str(p.root)}
    lib = jemalloc_path() if jemalloc else None
    if lib is not None:
        own["LD_PRELOAD"] = str(lib)
    return own


def daemon_env(p: SwitchPaths, *, jemalloc: bool) -> dict[str, str]:
    """The whole environment of a switch's daemons started on this machine."""
    return dict(os.environ, **daemon_vars(p, jemalloc=jemalloc))


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def vswitchd_alive(pid: object) -> bool:
    """Is ``pid`` a live ovs-vswitchd (not a recycled pid)?"""
    return isinstance(pid, int) and process_alive(pid) and \
        any(part.endswith("ovs-vswitchd") for part in process_cmdline(pid))


def appctl_argv(p: SwitchPaths, *command: str) -> list[str]:
    return ["ovs-appctl", "-t", str(p.vswitchd_ctl), *command]


def isolated_switch_class() -> Any:
    """A Mininet switch node that lives in its own network namespace and whose
    Open vSwitch instance the testbed starts itself (in parallel, after the
    links exist), so Mininet's start() and stop() do nothing for it."""
    from mininet.node import Switch

    class IsolatedOVSSwitch(Switch):  # type: ignore[misc]
        def __init__(self, name: str, **params: Any) -> None:
            params["inNamespace"] = True
            super().__init__(name, **params)

        def start(self, controllers: Any) -> None:
            pass

        def stop(self, deleteIntfs: bool = True) -> None:
            pass

    return IsolatedOVSSwitch
