"""TCP sockets in another GPU host's network namespace.

A tensor-parallel instance spans ``tp`` GPU hosts, and its worker process runs
in the namespace of its rank-0 host.  The flows of ranks 1..tp-1 must leave
from (prefill) or arrive at (decode) their own hosts, so the worker creates
their sockets inside those hosts' namespaces: ``setns(2)`` into the rank
host's namespace (``/proc/<pid>/ns/net`` of a process living there, which the
launcher names), create the socket, ``setns`` back.  A socket belongs to the
namespace it was created in for its whole life, so everything done with it
later (bind, connect, send, receive) happens there.  Only the calling thread
changes namespace, and only between the two calls; the workers are
single-threaded asyncio programs.  ``setns`` needs ``CAP_SYS_ADMIN`` (the
testbed runs as root).  ``netns=None`` is the worker's own namespace (rank 0,
and every rank on 127.0.0.1 under :class:`workers.launch.LocalLauncher`).
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000  # <sched.h>
OWN_NETNS_PATH = "/proc/thread-self/ns/net"


def _setns(libc: ctypes.CDLL, fd: int, what: str) -> None:
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into {what}: {os.strerror(err)}")


def tcp_socket_in(netns: str | None) -> socket.socket:
    """A new IPv4 TCP socket in the network namespace at path ``netns``
    (``None``: this thread's own)."""
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open(OWN_NETNS_PATH, os.O_RDONLY)
    try:
        target = os.open(netns, os.O_RDONLY)
        try:
            _setns(libc, target, netns)
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            finally:
                try:
                    _setns(libc, own, "the worker's own namespace")
                except OSError as exc:
                    # Every later socket would silently live in the wrong host.
                    print(f"netkv worker: cannot return to its own network namespace: {exc}", file=sys.stderr,
                          flush=True)
                    os._exit(70)
        finally:
            os.close(target)
    finally:
        os.close(own)
