"""Pieces the benchmarks share (not a benchmark itself)."""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

from netkv.repo import REPO_ROOT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def controller_ports(of_port: int | None, rest_port: int | None) -> tuple[int, int]:
    """The given OpenFlow and REST ports, free ones where not given, never equal."""
    of = of_port or free_port()
    rest = rest_port or free_port()
    while rest == of:
        rest = free_port()
    return of, rest


def fresh_out_dir(ap: argparse.ArgumentParser, given: str | None, stem: str) -> Path:
    """The benchmark's output directory: the one given, or runs/<stem>-<time>;
    an existing non-empty one is refused (argparse error)."""
    out = Path(given) if given else REPO_ROOT / "runs" / time.strftime(f"{stem}-%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    return out
