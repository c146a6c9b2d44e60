"""How worker processes are started and where their KV listeners live.

The frontend (:func:`workers.run.replay`) never starts a process itself: it
asks a :class:`Launcher`.  :class:`LocalLauncher` runs every worker on this
machine with its data listener on 127.0.0.1 (one port per host) and is what
the unit tests use.  The testbed's Mininet launcher implements the same
protocol: ``popen`` runs the argv inside the host's network namespace
(``host.popen``) and ``data_addr`` answers ``(topo.ip_of(host), fixed port)``.

Contract for implementations:

* ``popen(host, argv, log_path)`` starts ``argv`` as given (a list, never a
  shell string), with stdout and stderr appended to ``log_path``, the working
  directory :data:`REPO_ROOT` (so ``python -m workers.prefill`` imports this
  tree) and returns the :class:`subprocess.Popen`, whose ``pid`` must be the
  worker's own pid (the frontend ends workers by that pid).
* ``data_addr(host)`` is the address the decode worker on ``host`` binds and
  prefill workers connect to.  It must be stable for the run and distinct
  per host where hosts share an address.
* ``netns_path(host)`` (needed only with tensor parallelism, where one worker
  plays the ``tp`` GPU hosts of an instance from its rank-0 host): the path of
  ``host``'s network namespace, which the worker opens the other ranks'
  sockets in (:mod:`workers.netns`), or None when every host shares the
  worker's own namespace.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Protocol

from netkv.repo import REPO_ROOT, child_env


class Launcher(Protocol):
    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen: ...

    def data_addr(self, host: str) -> tuple[str, int]: ...


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


class LocalLauncher:
    """All workers on this machine, data listeners on ``ip`` (127.0.0.1).

    Ports: ``base_port + k`` for the k-th host asked about, or (default,
    ``base_port=None``) a port the kernel reports free at the time of asking."""

    def __init__(self, ip: str = "127.0.0.1", base_port: int | None = None) -> None:
        if base_port is not None and not 1024 <= base_port <= 65000:
            raise ValueError(f"base_port must be in 1024..65000, got {base_port!r}")
        self.ip = ip
        self.base_port = base_port
        self._ports: dict[str, int] = {}
        self.started: list[subprocess.Popen] = []

    def data_addr(self, host: str) -> tuple[str, int]:
        if host not in self._ports:
            if self.base_port is None:
                port = _free_port(self.ip)
                while port in self._ports.values():
                    port = _free_port(self.ip)
            else:
                port = self.base_port + len(self._ports)
            self._ports[host] = port
        return self.ip, self._ports[host]

    def netns_path(self, host: str) -> str | None:
        """Every host is this machine's namespace (distinct ports on ``ip``)."""
        return None

    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=child_env(),
                start_new_session=True,  # a Ctrl-C in the terminal reaches the frontend only
            )
        self.started.append(proc)
        return proc
