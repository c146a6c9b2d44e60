"""Egress-queue occupancy of the switch interfaces, read with ``tc``.

The testbed shapes each switch interface with an htb root qdisc (one class at
the emulated rate, a pfifo leaf).  When the switches share the root namespace
(one Open vSwitch for all), one ``qdisc show`` there lists every switch
interface; when every switch has a namespace of its own (one Open vSwitch
instance per switch), each namespace is read in turn.  Starting a ``tc`` per
namespace per round cost ~4.5% of a core on the default fabric (18
namespaces, once a second), so :class:`QueueReader` keeps one ``tc -batch``
process per namespace alive and writes it one ``qdisc show`` line per round;
tc answers each with one line of JSON (~0.1 ms).  The root qdisc's figures
are what we keep: htb accounts the backlog and drops of all its classes and
leaves at the root, so its ``backlog`` is the interface's whole egress queue.

Only interfaces whose names start with the testbed prefix are kept.
"""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from typing import Any, Sequence

from .state import QueueSample

TC_TIMEOUT_S = 5.0


class QueueReadError(RuntimeError):
    """``tc`` is missing, failed or printed something unexpected."""


def tc_batch_argv(netns: str | None = None) -> list[str]:
    """A long-lived tc that reads commands on stdin and prints JSON."""
    return ["tc", *(["-n", netns] if netns else []), "-s", "-j", "-batch", "-"]


SHOW_LINE = "qdisc show\n"


class QueueReader:
    """Root-qdisc figures of ``prefix*`` interfaces, read through one
    persistent ``tc -batch`` per namespace (``netns``; empty: this one).

    A tc that died (its namespace went away, or it failed) is started again
    at the next read; a namespace that cannot be read makes that read raise
    :class:`QueueReadError` naming it, after the others were read."""

    def __init__(self, prefix: str, netns: Sequence[str] = ()) -> None:
        if not prefix:
            raise ValueError("an interface prefix is required, got an empty string")
        self.prefix = prefix
        self.targets: list[str | None] = list(netns) or [None]
        self.procs: dict[str | None, subprocess.Popen[str]] = {}

    def _proc(self, ns: str | None) -> subprocess.Popen[str]:
        proc = self.procs.get(ns)
        if proc is None or proc.poll() is not None:
            if shutil.which("tc") is None:
                raise QueueReadError("tc is not installed (package iproute2)")
            proc = subprocess.Popen(tc_batch_argv(ns), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, bufsize=1)
            self.procs[ns] = proc
        return proc

    def _read_one(self, ns: str | None, now: float) -> list[QueueSample]:
        where = f" in namespace {ns}" if ns else ""
        proc = self._proc(ns)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(SHOW_LINE)
            proc.stdin.flush()
        except OSError:
            pass  # it died: said below
        ready, _, _ = select.select([proc.stdout], [], [], TC_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            self._drop(ns)
            raise QueueReadError(f"tc{where} gave no answer"
                                 + (f": {proc.stderr.read().strip()[:200]}" if proc.poll() is not None
                                    and proc.stderr is not None else f" within {TC_TIMEOUT_S} s"))
        return parse_qdisc_json(line, now, self.prefix)

    def read(self, now: float) -> list[QueueSample]:
        out: list[QueueSample] = []
        errors: list[str] = []
        for ns in self.targets:
            try:
                out += self._read_one(ns, now)
            except QueueReadError as exc:
                errors.append(str(exc))
        if errors:
            raise QueueReadError(f"{len(errors)} of {len(self.targets)} namespaces unread; first: {errors[0]}")
        return out

    def _drop(self, ns: str | None) -> None:
        proc = self.procs.pop(ns, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def close(self) -> None:
        for ns in list(self.procs):
            self._drop(ns)


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
