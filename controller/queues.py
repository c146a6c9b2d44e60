"""Egress-queue occupancy of the switch interfaces, read with ``tc``.

The testbed shapes each switch interface with an htb root qdisc (one class at
the emulated rate, a pfifo leaf).  With the userspace datapath the switch
interfaces are veths in the root namespace, so one ``tc -s -j qdisc show``
(argv list, no shell) dumps every interface's qdiscs at once; running
``tc -s class show dev IF`` per interface would cost one process per interface
per round.  When every switch has a namespace of its own (one Open vSwitch
instance per switch), ``tc -n NETNS`` reads each namespace in turn, one
process per switch per round.  The root qdisc's figures are what we keep: htb accounts the backlog
and drops of all its classes and leaves at the root, so its ``backlog`` is the
interface's whole egress queue.

Only interfaces whose names start with the testbed prefix are kept.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any, Sequence

from .state import QueueSample

TC_TIMEOUT_S = 5.0


class QueueReadError(RuntimeError):
    """``tc`` is missing, failed or printed something unexpected."""


def tc_argv(netns: str | None = None) -> list[str]:
    return ["tc", *(["-n", netns] if netns else []), "-s", "-j", "qdisc", "show"]


def parse_qdisc_json(text: str, now: float, prefix: str) -> list[QueueSample]:
    """Root qdiscs of interfaces named ``prefix...`` from ``tc -s -j qdisc show``."""
    try:
        rows: Any = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise QueueReadError(f"tc printed no valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise QueueReadError(f"tc JSON is a {type(rows).__name__}, expected a list")
    out: list[QueueSample] = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        dev = row.get("dev")
        if not isinstance(dev, str) or not dev.startswith(prefix) or not row.get("root"):
            continue
        try:
            out.append(QueueSample(
                interface=dev, t_s=now, kind=str(row.get("kind", "?")),
                backlog_bytes=int(row.get("backlog", 0)), backlog_packets=int(row.get("qlen", 0)),
                drops_total=int(row.get("drops", 0)), overlimits_total=int(row.get("overlimits", 0)),
                sent_bytes_total=int(row.get("bytes", 0))))
        except (TypeError, ValueError) as exc:
            raise QueueReadError(f"tc row for {dev} has a non-integer figure: {exc}") from None
    return out


def read_queue_stats(prefix: str, now: float, netns: Sequence[str] = ()) -> list[QueueSample]:
    """Root-qdisc figures of ``prefix*`` interfaces: one ``tc`` in this
    namespace, or one in each of the named namespaces ``netns``."""
    if not prefix:
        raise ValueError("an interface prefix is required, got an empty string")
    if shutil.which("tc") is None:
        raise QueueReadError("tc is not installed (package iproute2)")
    out: list[QueueSample] = []
    targets: list[str | None] = list(netns) or [None]
    for ns in targets:
        try:
            done = subprocess.run(tc_argv(ns), capture_output=True, text=True, timeout=TC_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise QueueReadError(f"tc did not answer within {TC_TIMEOUT_S} s") from None
        if done.returncode != 0:
            where = f" in namespace {ns}" if ns else ""
            raise QueueReadError(f"tc{where} exited with {done.returncode}: {done.stderr.strip()[:200]}")
        out += parse_qdisc_json(done.stdout, now, prefix)
    return out
