"""Removing exactly what one testbed instance created, safe to repeat.

A running instance records what it starts in ``/run/netkv/<prefix>/``:
``state.json`` (the owner process, the controller, every Mininet node shell)
and ``pids.jsonl`` (worker and traffic processes started later, one line
each).  In the per_switch mode every switch also has its own Open vSwitch
daemons and files under ``/run/netkv/<prefix>/sw/<switch>/`` and a network
namespace attached as ``<prefix><switch>`` (:mod:`fabric.switches`).
Every pid is stored with a marker that must still appear in its
command line before it is signalled, so a recycled pid is never hit.

The sweep (:func:`sweep`), used by teardown, by ``netkv down`` / ``netkv
clean`` and after a crash:
1. ends recorded processes (TERM, then KILL), workers first;
2. deletes the Open vSwitch bridges named with the prefix (shared mode) and
   ends the per-switch ``ovsdb-server``/``ovs-vswitchd`` daemons, found by
   their own directory in their command line;
3. ends the Mininet node shells and deletes the namespaces attached under
   this prefix's node names (the veth ends inside go with them);
4. deletes the veths left in the root namespace that carry the prefix, and
   the per-switch directories;
5. reports what is still there (:func:`leftovers`).
It never uses ``mn -c`` and never signals a process by a broad name: only pids
it recorded, node shells whose command line names this prefix's own nodes,
and switch daemons whose command line names this prefix's own directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from fabric.switches import switches_root
from fabric.system import OVS_DB_SOCKET, process_alive, process_cmdline, run

STATE_ROOT = Path(os.environ.get("NETKV_STATE_ROOT", "/run/netkv"))


def state_dir(prefix: str) -> Path:
    return STATE_ROOT / prefix


def node_name_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}([gvtac]\d+|ctl)$")


def intf_name_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(prefix)}[gvtac]\d+-eth\d+$")


@dataclass
class Leftovers:
    bridges: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    switch_instances: list[str] = field(default_factory=list)  # what is left in the per-switch directory
    # a testbed on several servers: server name -> what its own sweep says is left (or why it could not run)
    servers: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (len(self.bridges) + len(self.interfaces) + len(self.processes) + len(self.namespaces)
                + len(self.switch_instances) + len(self.servers))

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "bridges": self.bridges, "interfaces": self.interfaces, "processes": self.processes,
            "namespaces": self.namespaces, "switch_instances": self.switch_instances}
        if self.servers:
            out["servers"] = dict(self.servers)
        out["total"] = self.total
        return out


def write_state(prefix: str, data: dict[str, object]) -> None:
    d = state_dir(prefix)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / "state.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(d / "state.json")


def read_state(prefix: str) -> dict[str, object] | None:
    try:
        data = json.loads((state_dir(prefix) / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def record_pid(prefix: str, pid: int, marker: str, kind: str) -> None:
    """Remember a process started inside this instance (a worker, iperf3...)."""
    d = state_dir(prefix)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "pids.jsonl", "a") as fh:
        fh.write(json.dumps({"pid": pid, "marker": marker, "kind": kind}) + "\n")


def recorded_pids(prefix: str) -> list[tuple[int, str, str]]:
    """(pid, marker, kind) of everything recorded, workers before nodes."""
    out: list[tuple[int, str, str]] = []
    try:
        for line in (state_dir(prefix) / "pids.jsonl").read_text().splitlines():
            try:
                item = json.loads(line)
                out.append((int(item["pid"]), str(item["marker"]), str(item["kind"])))
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    state = read_state(prefix) or {}
    ctl = state.get("controller_pid")
    if isinstance(ctl, int):
        out.append((ctl, "controller", "controller"))
    nodes = state.get("node_pids")
    if isinstance(nodes, dict):
        for name, pid in nodes.items():
            if isinstance(pid, int):
                out.append((pid, f"mininet:{name}", "node"))
    return out


def _matches(pid: int, marker: str) -> bool:
    return any(marker in part for part in process_cmdline(pid))


def _processes_with(matches: Callable[[str], bool]) -> list[int]:
    """Pids of processes with a command-line argument for which ``matches`` holds."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() \
                and any(matches(part) for part in process_cmdline(int(entry.name))):
            pids.append(int(entry.name))
    return pids


def node_shells(prefix: str) -> list[int]:
    """Pids of Mininet node shells of this prefix's own nodes (exact names)."""
    pattern = node_name_re(prefix)
    return _processes_with(lambda part: part.startswith("mininet:") and bool(pattern.match(part[8:])))


def _switch_dir_marker(prefix: str) -> str:
    """What every per-switch daemon of the prefix has in its command line."""
    return str(switches_root(state_dir(prefix))) + "/"


def switch_daemons(prefix: str) -> list[int]:
    """Pids of the per-switch ovsdb-server / ovs-vswitchd daemons of this
    prefix: an argument of theirs names a file in the prefix's own directory."""
    own = _switch_dir_marker(prefix)
    return _processes_with(lambda part: own in part)


def switch_instance_files(prefix: str) -> list[str]:
    """What is left in the per-switch directory: instance directories (with
    their databases, pid files and control sockets), the controller socket,
    the bridges' management sockets."""
    root = switches_root(state_dir(prefix))
    try:
        return sorted(d.name for d in root.iterdir())
    except OSError:
        return []


def end_processes(targets: Iterable[tuple[int, str]], grace_s: float = 3.0) -> None:
    """TERM every live (pid, marker) whose command line still shows the marker;
    KILL what is left after ``grace_s``."""
    live = [pid for pid, marker in targets if pid != os.getpid()
            and process_alive(pid) and _matches(pid, marker)]
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while live and time.monotonic() < deadline:
        live = [pid for pid in live if process_alive(pid)]
        time.sleep(0.05)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while any(process_alive(p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in live:  # reap our own children so they do not linger as zombies
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def our_bridges(prefix: str) -> list[str]:
    """Bridges of the prefix in the machine's shared Open vSwitch (none when it
    is not running: the per-switch mode does not need it)."""
    if not OVS_DB_SOCKET.exists():
        return []
    proc = run(["ovs-vsctl", "--timeout=5", "list-br"], check=False)
    if proc.returncode != 0:
        return []
    pattern = node_name_re(prefix)
    return [b for b in proc.stdout.split() if pattern.match(b)]


def our_interfaces(prefix: str) -> list[str]:
    proc = run(["ip", "-o", "link", "show"], check=False)
    pattern = intf_name_re(prefix)
    found = []
    for line in proc.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if pattern.match(name):
            found.append(name)
    return found


def our_namespaces(prefix: str) -> list[str]:
    """Named namespaces of this prefix: netem probes and the switches' own."""
    proc = run(["ip", "netns", "list"], check=False)
    nodes = node_name_re(prefix)
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.split()]
    return [n for n in names if n.startswith(f"{prefix}probe") or nodes.match(n)]


def leftovers(prefix: str) -> Leftovers:
    procs = sorted({pid for pid, marker, _ in recorded_pids(prefix)
                    if process_alive(pid) and _matches(pid, marker)}
                   | set(node_shells(prefix)) | {p for p in switch_daemons(prefix) if process_alive(p)})
    return Leftovers(our_bridges(prefix), our_interfaces(prefix), procs, our_namespaces(prefix),
                     switch_instance_files(prefix))


def sweep(prefix: str) -> Leftovers:
    """Remove everything of instance ``prefix``; returns what is still there."""
    recorded = recorded_pids(prefix)
    # 1. workers, traffic generators and the controller
    end_processes([(p, m) for p, m, k in recorded if k not in ("node",)])
    # 2. bridges
    bridges = our_bridges(prefix)
    if bridges:
        argv = ["ovs-vsctl", "--timeout=20"]
        for br in bridges:
            argv += ["--", "--if-exists", "del-br", br]
        run(argv, check=False, timeout_s=60)
    own_dir = _switch_dir_marker(prefix)
    end_processes([(p, own_dir) for p in switch_daemons(prefix)])
    # 3. node shells (recorded and found by their exact names)
    shells = [(p, m) for p, m, k in recorded if k == "node"]
    shells += [(p, "mininet:") for p in node_shells(prefix)]
    end_processes(shells, grace_s=1.0)
    # 4. veths left in the root namespace
    intfs = our_interfaces(prefix)
    if intfs:
        run(["ip", "-force", "-batch", "-"], check=False,
            input_text="".join(f"link delete dev {i}\n" for i in intfs))
    for ns in our_namespaces(prefix):
        run(["ip", "netns", "delete", ns], check=False)
    shutil.rmtree(switches_root(state_dir(prefix)), ignore_errors=True)
    left = leftovers(prefix)
    if left.total == 0:
        for name in ("pids.jsonl", "state.json"):
            try:
                (state_dir(prefix) / name).unlink()
            except OSError:
                pass
    return left
