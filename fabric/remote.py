"""The testbed on several servers: where each command runs, and the parts of
the bring-up that touch the other servers (docs/design.md, "Past one machine").

:mod:`fabric.cluster` decides, without touching anything, which server runs
each node and which links cross machines.  This module carries that out
beside Mininet Cluster Edition (MCE, ``mininet.examples.cluster``, Debian's
``mininet`` package):

* :class:`Sites` wraps an argv so that it runs where a node lives: unchanged
  on the head (this machine), else ``ssh root@ADDRESS`` with the command
  quoted word by word.  The testbed's own commands to a server share one ssh
  connection (a control master whose socket lies in the prefix's state
  directory; the sweep ends it, and it ends itself when idle); the
  bring-up runs at most :data:`SESSIONS_PER_SERVER` of them at a time
  (sshd allows 10 sessions per connection by default);
* :func:`mce` imports MCE's classes and makes the per-switch node class a
  remote one (``RemoteMixin``): MCE starts every node's shell over its own ssh
  session (``ssh -tt``, as it always does), so the node's namespaces live on
  its server and its pid is the pid there;
* :func:`relay_argv` is the OpenFlow relay each worker runs for its switch
  processes (they live in namespaces of their own and reach the relay's Unix
  socket; the relay reaches the controller on the head's management address);
* :func:`sweep_argv` is the prefix's sweep on a worker (its own ``netkv
  clean``), which ends what the bring-up started there: node shells by their
  names, switch daemons and the relay by the prefix's directory in their
  command lines, namespaces and interfaces by their prefixed names.
"""

from __future__ import annotations

import os
import pwd
import shlex
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from fabric import switches
from fabric.cluster import (CLOCK_ECHO_PY, CLOCK_SAMPLES, MAX_CLOCK_UNCERTAINTY_S, SSH_OPTIONS, ClockEcho,
                            ClockOffset, ClusterError, ClusterPlan, Server, check_clocks, clock_offset,
                            run_command)
from netkv.repo import REPO_ROOT

# sshd's MaxSessions is 10 by default: the testbed's commands to one server
# share one connection and stay below that.
SESSIONS_PER_SERVER = 8
# How long an idle control master stays (the sweep ends it at once).
CONTROL_PERSIST_S = 15


def control_path(state_dir: Path, server: Server, group: int = 0) -> Path:
    """The ssh control socket for ``server``, in the prefix's state directory
    (not its switch directory, whose contents count as the prefix's leftovers).
    Group 0 carries the testbed's own commands; groups 1, 2, ... carry the
    replay's worker sessions, :data:`SESSIONS_PER_SERVER` to a connection."""
    return state_dir / (f"ssh-{server.name}" if group == 0 else f"ssh-{server.name}-{group}")


def control_paths(state_dir: Path, server: Server) -> list[Path]:
    """Every control socket of ``server`` present in the state directory."""
    return sorted({*state_dir.glob(f"ssh-{server.name}"), *state_dir.glob(f"ssh-{server.name}-*")})


def ssh_mux_argv(server: Server, state_dir: Path, remote_argv: Sequence[str], *, tty: bool = False,
                 group: int = 0) -> list[str]:
    """``ssh root@ADDRESS COMMAND`` over the server's shared connection (of
    ``group``), the remote command quoted word by word for the remote shell."""
    return ["ssh", "-tt" if tty else "-T", *SSH_OPTIONS, "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control_path(state_dir, server, group)}", "-o", f"ControlPersist={CONTROL_PERSIST_S}",
            f"root@{server.address}", "--", shlex.join(list(remote_argv))]


def ssh_exit_argv(server: Server, path: Path) -> list[str]:
    """Ask the server's control master at ``path``, if any, to end."""
    return ["ssh", "-o", f"ControlPath={path}", "-O", "exit", f"root@{server.address}"]


def forward_argv(server: Server, remote_socket: Path, local_socket: Path) -> list[str]:
    """An ssh connection of its own that makes ``remote_socket`` on the server a
    Unix socket whose every connection is carried to ``local_socket`` here (the
    replay's control socket): the workers there reach the frontend through it,
    over the management network, with nothing listening on a network address.
    It exits at once if the forward cannot be made."""
    return ["ssh", "-N", "-T", *SSH_OPTIONS, "-o", "ControlPath=none", "-o", "ExitOnForwardFailure=yes",
            "-o", "ServerAliveInterval=5", "-R", f"{remote_socket}:{local_socket}", f"root@{server.address}"]


def worker_control_socket(state_dir: Path, tag: str) -> Path:
    """Where the workers of a replay on another server find the frontend's
    control socket (forwarded there by :func:`forward_argv`): in the prefix's
    switch directory, so the prefix's sweep on that server finds the workers
    by it in their command lines and removes the socket."""
    return switches.switches_root(state_dir) / f"ctl-{tag}.sock"


def with_env(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """``env K=V ... argv``: an environment that crosses ssh as arguments."""
    return ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *argv] if env else list(argv)


class Sites:
    """Which server each node of the fabric runs on, and how to run a command
    there.  On one machine every node is local and every argv is unchanged."""

    def __init__(self, plan: ClusterPlan | None, state_dir: Path) -> None:
        self.plan = plan
        self.state_dir = state_dir
        self.servers: list[Server] = list(plan.placement.servers) if plan is not None else []
        self.head: Server | None = self.servers[0] if self.servers else None
        by_name = {s.name: s for s in self.servers}
        self._server_of: dict[str, Server] = (
            {node: by_name[name] for node, name in plan.placement.server_of.items()} if plan is not None else {})

    @property
    def cluster(self) -> bool:
        return self.plan is not None

    @property
    def workers(self) -> list[Server]:
        return self.servers[1:]

    def server_of(self, node: str) -> Server | None:
        """The server ``node`` runs on, None for this machine (the head)."""
        server = self._server_of.get(node)
        return None if server is None or server is self.head else server

    def is_local(self, node: str) -> bool:
        return self.server_of(node) is None

    def on(self, node: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """argv that runs ``argv`` (with ``env`` added) where ``node`` lives."""
        return self.on_server(self.server_of(node), argv, env)

    def on_server(self, server: Server | None, argv: Sequence[str],
                  env: Mapping[str, str] | None = None) -> list[str]:
        if server is None:
            return with_env(argv, env or {})
        self.state_dir.mkdir(parents=True, exist_ok=True)  # where the control socket goes
        return ssh_mux_argv(server, self.state_dir, with_env(argv, env or {}))


# -- a replay's workers on other servers ------------------------------------------------------------
# The remote side of a worker session: the repository's own tree first on the
# import path (the same checkout path on every server, the preflight checked the
# commit) and unbuffered output, as netkv.repo.child_env gives a local worker.
def worker_env() -> dict[str, str]:
    return {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


class WorkerSessions:
    """Sessions for a replay's worker processes on other servers.

    A worker runs in its GPU host's namespaces there (``mnexec -a PID``, as
    Mininet's own ``popen`` enters a host) in an ssh session with a terminal
    (``-tt``): the frontend ends a worker by ending that session's ssh here,
    which hangs up the terminal there, and the hang-up ends the worker.  The
    sessions share connections, :data:`SESSIONS_PER_SERVER` to each (sshd's
    MaxSessions is 10 by default); each connection is opened, one after the
    other, before its first session, so that many workers starting at once
    never meet sshd's limit on connections still being authenticated
    (MaxStartups).  (Mininet Cluster Edition's own ``popen`` joins the argv
    with spaces for the remote shell and opens no terminal: a JSON argument
    would be split, and ending the ssh would leave the worker running.)"""

    def __init__(self, state_dir: Path, runner: Any = None) -> None:
        self.state_dir = state_dir
        self.run = runner if runner is not None else run_command
        self.started: dict[str, int] = {}  # server name -> sessions asked for
        self.opened: set[tuple[str, int]] = set()

    def argv(self, server: Server, host_pid: int, argv: Sequence[str]) -> list[str]:
        """The local argv of a session that runs ``argv`` in the namespaces of
        ``host_pid`` on ``server``, from the checkout, as a worker runs here."""
        n = self.started.get(server.name, 0)
        self.started[server.name] = n + 1
        group = 1 + n // SESSIONS_PER_SERVER
        if (server.name, group) not in self.opened:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            result = self.run(ssh_mux_argv(server, self.state_dir, ["true"], group=group), 60.0)
            if result.returncode != 0:
                raise ClusterError(f"{server.label}: cannot open an ssh connection for workers: "
                                   f"{result.first_line()}")
            self.opened.add((server.name, group))
        remote_argv = ["env", "-C", str(REPO_ROOT), *(f"{k}={v}" for k, v in sorted(worker_env().items())),
                       "mnexec", "-a", str(host_pid), *argv]
        return ssh_mux_argv(server, self.state_dir, remote_argv, tty=True, group=group)


# How often a replay across servers measures every server's clock offset again.
CLOCK_INTERVAL_S = 5.0


class ClockWatch:
    """Each other server's clock offset to the head, measured when a replay
    starts and every :data:`CLOCK_INTERVAL_S` while it runs, over one echo
    session per server (:class:`fabric.cluster.ClockEcho`, kept open).

    A worker's report is put on the head's clock with the latest offset of its
    server (:meth:`to_head_s`).  The replay is refused when a server's offset
    is known less well than ``bound_s`` at the start; a later measurement
    that is known less well, or that moved from the one before by more than
    ``bound_s`` (a time stamp corrected with the older one may be that far
    off), is a problem of the run, named in :meth:`stop`'s answer."""

    def __init__(self, servers: Sequence[Server], argv_for: Any, *, interval_s: float = CLOCK_INTERVAL_S,
                 bound_s: float = MAX_CLOCK_UNCERTAINTY_S, samples: int = CLOCK_SAMPLES) -> None:
        self.servers = list(servers)
        self.argv_for = argv_for  # (server, argv) -> the local argv that runs argv there
        self.interval_s = interval_s
        self.bound_s = bound_s
        self.count = samples
        self.echoes: dict[str, ClockEcho] = {}
        self.latest: dict[str, ClockOffset] = {}
        self.series: dict[str, list[tuple[float, ClockOffset]]] = {}
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="clock-watch", daemon=True)

    def start(self) -> None:
        """The first offsets: ClusterError (one line) when a server cannot be
        measured or is known less well than the bound (the replay is refused)."""
        try:
            for server in self.servers:
                self.echoes[server.name] = ClockEcho(server, self.argv_for(server, ["python3", "-c", CLOCK_ECHO_PY]))
                check_clocks([self._measure(server)], self.bound_s)
        except BaseException:
            self._close_echoes()
            raise
        self._thread.start()

    def _measure(self, server: Server) -> ClockOffset:
        off = clock_offset(server.name, self.echoes[server.name].samples(self.count))
        with self._lock:
            before = self.latest.get(server.name)
            self.latest[server.name] = off
            self.series.setdefault(server.name, []).append((time.time(), off))
        if before is not None:
            if off.uncertainty_s > self.bound_s:
                self.problems.append(f"server {server.name}: clock offset known only to "
                                     f"+-{off.uncertainty_s * 1e3:.3f} ms during the run (bound "
                                     f"{self.bound_s * 1e3:g} ms)")
            elif abs(off.offset_s - before.offset_s) > self.bound_s:
                self.problems.append(f"server {server.name}: clock offset moved "
                                     f"{(off.offset_s - before.offset_s) * 1e3:+.3f} ms between two measurements "
                                     f"{self.interval_s:g} s apart (bound {self.bound_s * 1e3:g} ms)")
        return off

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for server in self.servers:
                try:
                    self._measure(server)
                except ClusterError as exc:
                    self.problems.append(str(exc))

    def offset_s(self, server: str) -> float:
        """The server's clock minus the head's, as last measured."""
        with self._lock:
            return self.latest[server].offset_s

    def to_head_s(self, server: str, t_s: float) -> float:
        return t_s - self.offset_s(server)

    def _close_echoes(self) -> None:
        for echo in self.echoes.values():
            echo.close()
        self.echoes.clear()

    def stop(self) -> dict[str, Any]:
        """A last measurement, the echoes ended; what ``run.json`` keeps: every
        server's offsets over the run (``[t_s on the head, offset_s,
        uncertainty_s]``), the largest uncertainty and how far the offset
        moved, the bound, and the problems found."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 30)
        for server in self.servers:
            if server.name in self.echoes:
                try:
                    self._measure(server)
                except ClusterError as exc:
                    self.problems.append(str(exc))
        self._close_echoes()
        out: dict[str, Any] = {"bound_s": self.bound_s, "interval_s": self.interval_s, "servers": {},
                               "problems": list(self.problems)}
        for name, points in self.series.items():
            offsets = [o.offset_s for _, o in points]
            out["servers"][name] = {
                "offset_s": points[-1][1].offset_s,
                "uncertainty_s_max": max(o.uncertainty_s for _, o in points),
                "offset_range_s": max(offsets) - min(offsets),
                "series": [[round(t, 3), o.offset_s, o.uncertainty_s] for t, o in points],
            }
        return out


def mce() -> dict[str, Any]:
    """MCE's classes the bring-up uses, and the per-switch node made remote.

    ``MininetCluster`` holds the servers; ``RemoteHost`` is a GPU host on any
    server (``server='localhost'`` is the head's); ``RemoteLink`` makes a veth
    pair on the server of both ends; ``RemoteGRELink`` a keyed gretap tunnel
    between two servers.  The per-switch node (fabric.switches) becomes
    ``RemoteMixin`` + that node, so its namespace is on its server too."""
    from mininet.examples.cluster import (MininetCluster, RemoteGRELink, RemoteHost, RemoteLink,
                                          RemoteMixin)

    # MininetCluster makes ~/.ssh/mn from $HOME, which a systemd unit or cron need not set
    os.environ.setdefault("HOME", str(home()))

    isolated = switches.isolated_switch_class()
    remote_switch = type("RemoteIsolatedOVSSwitch", (RemoteMixin, isolated), {})
    return {"net": MininetCluster, "host": RemoteHost, "switch": remote_switch, "link": RemoteLink,
            "gre_link": RemoteGRELink}


def relay_argv(state_dir: Path, head: Server, of_port: int) -> list[str]:
    """The OpenFlow relay of a worker (run there, from its checkout): the
    switch processes' Unix socket, relayed to the controller on the head's
    management address."""
    return [str(REPO_ROOT / ".venv" / "bin" / "python"), "-m", "controller.relay",
            "--unix", str(switches.controller_socket(state_dir)), "--to-host", head.address,
            "--to-port", str(of_port)]


def sweep_argv(prefix: str) -> list[str]:
    """The prefix's sweep, run on a worker by its own checkout."""
    return [str(REPO_ROOT / ".venv" / "bin" / "netkv"), "clean", "--prefix", prefix]


def workers_of_state(state: Mapping[str, object] | None) -> list[Server]:
    """The other servers of the testbed recorded in a prefix's state.json
    (its saved configuration's ``servers``); none on one machine."""
    from fabric.cluster import ClusterError, servers_from_json

    config = (state or {}).get("config")
    items = config.get("servers") if isinstance(config, dict) else None
    if not items:
        return []
    try:
        return servers_from_json(items)[1:]
    except ClusterError:
        return []


def sweep_workers(prefix: str, workers: Sequence[Server], state_dir: Path,
                  runner: Any = None) -> dict[str, str]:
    """Each worker's own sweep of ``prefix`` (``netkv clean`` there, over ssh),
    then its ssh control master ended; server name -> what it reports left
    (or why it could not be reached), for every server that is not clean."""
    from fabric.cluster import run_command

    run = runner if runner is not None else run_command
    state_dir.mkdir(parents=True, exist_ok=True)  # where the control sockets go
    out: dict[str, str] = {}
    for server in workers:
        result = run(ssh_mux_argv(server, state_dir, sweep_argv(prefix)), 180.0)
        if result.returncode != 0:
            text = (result.stdout.strip().splitlines() or [""])[-1] or result.first_line()
            out[server.name] = text
    for server in workers:
        for path in control_paths(state_dir, server) or [control_path(state_dir, server)]:
            run(ssh_exit_argv(server, path), 10.0)
    return out


def status_argv(prefix: str) -> list[str]:
    """``netkv status --json`` for the prefix, run on a worker by its own checkout."""
    return [str(REPO_ROOT / ".venv" / "bin" / "netkv"), "status", "--prefix", prefix, "--json"]


def leftovers_total(status_stdout: str) -> int | None:
    """How many objects of the prefix a worker's ``netkv status --json`` found
    (None when its answer cannot be read)."""
    import json

    try:
        data = json.loads(status_stdout.strip().splitlines()[-1])
        return int(data["leftovers_or_live"]["total"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def home() -> Path:
    """$HOME, or this user's home directory from the password database when
    the environment has none (a systemd unit or cron need not set it)."""
    return Path(os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir)


def mce_dir() -> Path:
    """The directory MininetCluster makes for its ssh control sockets
    (``~/.ssh/mn``) whether or not it uses them."""
    return home() / ".ssh" / "mn"


def remove_mce_dir() -> None:
    """Remove MCE's directory if it is empty (it is, since the testbed does
    not use MCE's control sockets); never anything in it."""
    try:
        mce_dir().rmdir()
    except OSError:
        pass
