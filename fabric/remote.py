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
from pathlib import Path
from typing import Any, Mapping, Sequence

from fabric import switches
from fabric.cluster import SSH_CONNECT_TIMEOUT_S, ClusterPlan, Server
from netkv.repo import REPO_ROOT

# sshd's MaxSessions is 10 by default: the testbed's commands to one server
# share one connection and stay below that.
SESSIONS_PER_SERVER = 8
# How long an idle control master stays (the sweep ends it at once).
CONTROL_PERSIST_S = 15


def control_path(state_dir: Path, server: Server) -> Path:
    """The ssh control socket for ``server``, in the prefix's state directory
    (not its switch directory, whose contents count as the prefix's leftovers)."""
    return state_dir / f"ssh-{server.name}"


def ssh_mux_argv(server: Server, state_dir: Path, remote_argv: Sequence[str], *, tty: bool = False) -> list[str]:
    """``ssh root@ADDRESS COMMAND`` over the server's shared connection, in
    batch mode, the host key already known (the preflight checked it), the
    remote command quoted word by word for the remote shell."""
    return ["ssh", "-tt" if tty else "-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
            "-o", "StrictHostKeyChecking=yes", "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control_path(state_dir, server)}", "-o", f"ControlPersist={CONTROL_PERSIST_S}",
            f"root@{server.address}", "--", shlex.join(list(remote_argv))]


def ssh_exit_argv(server: Server, state_dir: Path) -> list[str]:
    """Ask the server's control master, if any, to end."""
    return ["ssh", "-o", f"ControlPath={control_path(state_dir, server)}", "-O", "exit", f"root@{server.address}"]


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
        run(ssh_exit_argv(server, state_dir), 10.0)
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
