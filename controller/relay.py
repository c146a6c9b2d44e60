"""A Unix-socket entrance to the controller's loopback OpenFlow listener.

Switch processes that run inside their own network namespaces (one per
switch, see fabric/switches.py) cannot reach 127.0.0.1 of the root
namespace, but a Unix socket in the filesystem is reachable from every
namespace.  Open vSwitch accepts ``unix:PATH`` as a controller target; this
relay accepts those connections and joins each to a fresh TCP connection to
the OpenFlow listener on loopback, byte for byte, in one thread (a selector
over every socket, non-blocking both ways with back-pressure).  No listener
beyond loopback and this socket is opened.

If the listener refuses (the controller is not up yet), the switch's
connection is closed at once and Open vSwitch retries with its backoff.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
from pathlib import Path

LOG = logging.getLogger("netkv.controller.relay")
CHUNK_BYTES = 65536


class UnixRelay:
    """Relay ``unix_path`` connections to ``(host, port)`` over TCP."""

    def __init__(self, unix_path: str | Path, host: str, port: int) -> None:
        self.path = Path(unix_path)
        self.target = (host, port)
        self.connections = 0  # accepted so far
        self.refused = 0  # closed because the TCP listener did not answer
        self._sel = selectors.DefaultSelector()
        self._peer: dict[socket.socket, socket.socket] = {}
        self._pending: dict[socket.socket, bytes] = {}  # bytes still to send to the key
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "UnixRelay":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise OSError(f"{self.path} exists and is not a socket")
            self.path.unlink()  # a socket left by an earlier controller of this testbed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, name="netkv-of-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for sock in list(self._peer):
            self._close(sock)
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        try:
            self.path.unlink()
        except OSError:
            pass

    @property
    def active(self) -> int:
        """Switch connections being relayed now."""
        return len(self._peer) // 2

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, events in self._sel.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                    continue
                if sock not in self._peer:
                    continue  # closed earlier in this round
                if events & selectors.EVENT_WRITE:
                    self._flush(sock)
                if events & selectors.EVENT_READ and sock in self._peer:
                    self._forward(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            switch_side, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.connections += 1
        try:
            ctl_side = socket.create_connection(self.target, timeout=2.0)
        except OSError as exc:
            self.refused += 1
            LOG.debug("OpenFlow listener %s:%d refused a relayed switch: %s", *self.target, exc)
            switch_side.close()
            return
        ctl_side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for sock in (switch_side, ctl_side):
            sock.setblocking(False)
            self._sel.register(sock, selectors.EVENT_READ)
            self._pending[sock] = b""
        self._peer[switch_side] = ctl_side
        self._peer[ctl_side] = switch_side

    def _interest(self, sock: socket.socket) -> None:
        """Read from a socket only while its peer has nothing left to send
        (back-pressure, so a slow side never makes the relay buffer without
        bound); wait for writability while it has bytes pending itself."""
        events = 0
        if not self._pending[self._peer[sock]]:
            events |= selectors.EVENT_READ
        if self._pending[sock]:
            events |= selectors.EVENT_WRITE
        registered = sock in self._sel.get_map()
        if events and registered:
            self._sel.modify(sock, events)
        elif events:
            self._sel.register(sock, events)
        elif registered:
            self._sel.unregister(sock)

    def _forward(self, src: socket.socket) -> None:
        try:
            data = src.recv(CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(src)
            return
        dst = self._peer[src]
        self._pending[dst] += data
        self._flush(dst)

    def _flush(self, sock: socket.socket) -> None:
        """Send what is pending for ``sock``, as much as it takes now."""
        data = self._pending[sock]
        try:
            sent = sock.send(data) if data else 0
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(sock)
            return
        self._pending[sock] = data[sent:]
        self._interest(sock)
        self._interest(self._peer[sock])

    def _close(self, sock: socket.socket) -> None:
        peer = self._peer.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peer.pop(s, None)
            self._pending.pop(s, None)
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m controller.relay``: a relay on its own, for a server of a
    testbed on several machines whose switch processes reach the controller
    on the head through it (fabric/remote.py).  Runs until SIGTERM, SIGINT or
    SIGHUP (its ssh session ending)."""
    import argparse
    import signal
    import sys

    ap = argparse.ArgumentParser(prog="python -m controller.relay",
                                 description="Relay OpenFlow connections from a Unix socket to a TCP listener "
                                             "(the controller on the head of a testbed on several servers).")
    ap.add_argument("--unix", required=True, metavar="PATH", help="the Unix socket switch processes connect to")
    ap.add_argument("--to-host", required=True, metavar="IPV4", help="the controller's OpenFlow address")
    ap.add_argument("--to-port", required=True, type=int, metavar="PORT", help="the controller's OpenFlow port")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: done.set())
    try:
        relay = UnixRelay(args.unix, args.to_host, args.to_port).start()
    except OSError as exc:
        print(f"relay: cannot listen on {args.unix}: {exc}", file=sys.stderr)
        return 1
    print(f"relay: {args.unix} -> {args.to_host}:{args.to_port}", flush=True)
    done.wait()
    relay.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
