"""The emulator's envelope: is this replay's figure the network's, or the emulator's?

While a replay runs, :class:`EmulatorMeter` samples once a second the CPU of
every switch process and of the machine as a whole, and the wall clock beside
the monotonic one.  :func:`envelope_verdict` then judges the replay, over its
own window: it left the envelope when the busiest switch process was busier
than ``ENVELOPE_CPU_PCT`` of a core, or the machine busier than
``ENVELOPE_MACHINE_PCT``, in 5% of its seconds (the 95th percentile), or when
time itself did not keep up (a request dispatched late, a hole in the samples,
the wall clock stepping past the monotonic one).  The verdict names the
resource; every figure of the replay carries it (``envelope.json``, the
comparison, the report).  Calibration and history: docs/design.md, "Envelope".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any, Callable

from fabric.system import cpu_ticks
from lab.verdict import ENVELOPE_CPU_PCT, ENVELOPE_MACHINE_PCT, rejudge
from netkv.stats import percentile


# -- measuring the emulator itself ------------------------------------------------------
class EmulatorMeter:
    """Samples, once a second while a replay runs, the CPU of every switch
    process (``{name: pid}``, fabric.net.Testbed.switch_processes) and of the
    machine as a whole (/proc/stat).

    On the userspace datapath the switch processes forward every emulated
    packet, and the hosts' TCP stacks, the workers and the traffic generators
    need CPU too: a replay ran inside the emulator's envelope when neither the
    busiest switch process nor the machine was busy in 95% of its seconds
    (:func:`envelope_verdict`).  On the kernel datapath forwarding happens in
    the kernel: the machine figure is the one that matters there."""

    def __init__(self, switch_pids: dict[str, int], interval_s: float = 1.0, *,
                 pids_source: Callable[[], dict[str, int]] | None = None) -> None:
        # pids_source: the switch processes now (a switch_restart event replaces
        # one; while it is down it is absent, and that is not a death)
        self.pids_source = pids_source
        self.pids = dict(switch_pids)
        self.interval_s = interval_s
        # One column per second, kept in flat arrays (a replay of hours keeps
        # them all, for the series): epoch s, monotonic s, machine busy %
        # (NaN: unknown), and per switch process its % of a core (NaN: not
        # measured in that second).  Where the wall clock advanced far more than
        # the monotonic one between two samples, the whole virtual machine was
        # paused (the guest's monotonic clock stands still meanwhile; its wall
        # clock is stepped forward afterwards, and every wall-clock time stamp
        # with it).
        self.t_s = array("d")
        self.mono_s = array("d")
        self.machine_pct = array("d")
        self.switch_pct: dict[str, array[float]] = {}
        self.died: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="emulator-meter", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        last = {name: cpu_ticks(pid) for name, pid in self.pids.items()}
        last_machine, last_t = machine_ticks(), time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            dt = now - last_t
            row: dict[str, float] = {}
            current = self.pids_source() if self.pids_source is not None else self.pids
            for name, pid in list(self.pids.items()):
                if current.get(name) != pid:  # restarting (absent) or restarted: a new baseline, not a death
                    now_pid = current.get(name)
                    last[name] = None if now_pid is None else cpu_ticks(now_pid)
                    if now_pid is not None:
                        self.pids[name] = now_pid
                    continue
                ticks = cpu_ticks(pid)
                before = last.get(name)
                if ticks is None or before is None:
                    if name not in self.died:
                        self.died.append(name)
                    last[name] = None
                    continue
                row[name] = 100.0 * (ticks - before) / self.hz / dt
                last[name] = ticks
            machine = machine_ticks()
            busy = machine[0] - last_machine[0]
            all_ticks = machine[1] - last_machine[1]
            self.add(time.time(), row, 100.0 * busy / all_ticks if all_ticks > 0 else None, time.monotonic())
            last_machine, last_t = machine, now

    def add(self, t_s: float, switch_pct: dict[str, float], machine_pct: float | None, mono_s: float) -> None:
        """One second's sample: its wall-clock time, each switch process's % of
        a core, the machine's busy %, its monotonic time."""
        n = len(self.t_s)
        self.t_s.append(t_s)
        self.mono_s.append(mono_s)
        self.machine_pct.append(math.nan if machine_pct is None else machine_pct)
        for name in switch_pct.keys() - self.switch_pct.keys():
            self.switch_pct[name] = array("d", [math.nan] * n)
        for name, column in self.switch_pct.items():
            column.append(switch_pct.get(name, math.nan))

    def stop(self, window_epoch_s: tuple[float, float] | None = None, *,
             dispatch_lag_ms: float | None = None) -> dict[str, Any]:
        """The replay's ``envelope.json``: figures over the samples inside
        ``window_epoch_s`` (the replay's requests: from the replay clock's
        start, after the workers are up, to its end; None: every sample), the
        whole series with what a later re-judgement needs, and the verdict
        (:func:`lab.verdict.rejudge`, the one implementation of the rule).
        ``dispatch_lag_ms``: the replay's largest dispatch lag, judged too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        n = len(self.t_s)
        t_first = self.t_s[0] if n else time.time()
        mono_first = self.mono_s[0] if n else 0.0
        window = window_epoch_s if window_epoch_s is not None else (t_first - self.interval_s,
                                                                      self.t_s[-1] if n else t_first)
        judged = [i for i in range(n) if window[0] + self.interval_s <= self.t_s[i] <= window[1]]

        def measured(i: int) -> list[float]:
            return [v for column in self.switch_pct.values() if not math.isnan(v := column[i])]

        per_switch = {name: [v for i in judged if not math.isnan(v := column[i])]
                      for name, column in self.switch_pct.items()}
        sum_pct = [sum(measured(i)) for i in judged]
        machine = [m for i in judged if not math.isnan(m := self.machine_pct[i])]
        p95 = {name: float(percentile(v, 95, method="lower") or 0.0) for name, v in per_switch.items() if v}
        busiest = max(p95, key=lambda n: p95[n]) if p95 else None
        out: dict[str, Any] = {
            "switch_processes": len(self.pids),
            "samples": len(judged),
            "samples_outside_window": n - len(judged),
            # the busiest single switch process: the one that saturates first
            "busiest_switch": busiest,
            "switch_cpu_pct_mean": _mean(per_switch[busiest]) if busiest else None,
            "switch_cpu_pct_max": _round1(max(per_switch[busiest])) if busiest else None,
            # every switch process together, % of one core
            "switch_cpu_sum_pct_mean": _mean(sum_pct),
            "switch_cpu_sum_pct_p95": _round1(percentile(sum_pct, 95, method="lower")),
            # the whole machine (every core), % of its capacity
            "machine_busy_pct_mean": _mean(machine),
            "switch_processes_died": list(self.died),
            "envelope_cpu_pct": ENVELOPE_CPU_PCT,
            "envelope_machine_pct": ENVELOPE_MACHINE_PCT,
            # what a re-judgement needs (lab.verdict): the clocks of the first sample and of the window
            "interval_s": self.interval_s,
            "series_start_epoch_s": round(t_first, 3),
            "window_epoch_s": [round(window[0], 3), round(window[1], 3)],
            # every sample: [s since the first, switch processes' sum, busiest one, machine busy,
            # monotonic s since the first], judged or not
            "series": [[round(self.t_s[i] - t_first, 3), round(sum(measured(i)), 1),
                        round(max(measured(i), default=0.0), 1),
                        None if math.isnan(self.machine_pct[i]) else round(self.machine_pct[i], 1),
                        round(self.mono_s[i] - mono_first, 3)]
                       for i in range(n)],
            # each switch process's % of a core in every sample (null: not measured then)
            "switch_series": {name: [None if math.isnan(v) else round(v, 1) for v in column]
                              for name, column in self.switch_pct.items()},
        }
        if dispatch_lag_ms is not None:
            out["dispatch_lag_ms_max"] = round(float(dispatch_lag_ms), 1)
        verdict = rejudge(out, None)
        out.update({k: verdict[k] for k in ("switch_cpu_pct_p95", "machine_busy_pct_p95", "sample_gap_s_max",
                                            "wall_clock_jump_s_max", "within_envelope", "limiting_resource")})
        return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0, 0
    values = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def _round1(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# -- the envelope of another server ------------------------------------------------------------
# A replay across servers judges each server by the same rule: on each other
# server, ``python -m lab.envelope --pids JSON`` runs an EmulatorMeter over the
# switch processes that live there, for the whole replay; one line on its stdin
# (``{"window_epoch_s": [a, b] | null, "dispatch_lag_ms": x | null}``, the
# window on that server's clock) stops it, and it answers with its envelope as
# one JSON line.  Closing its stdin without a line ends it quietly.
class RemoteMeter:
    """The head's end of one server's meter (``argv``: the local command that
    runs ``python -m lab.envelope`` there, e.g. over ssh)."""

    def __init__(self, server: str, argv: list[str], timeout_s: float = 60.0) -> None:
        self.server = server
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def stop(self, window_epoch_s: tuple[float, float] | None, dispatch_lag_ms: float | None = None
             ) -> dict[str, Any]:
        """The server's envelope over ``window_epoch_s`` (already on that
        server's clock), or ``{"error": ...}`` when its meter did not answer."""
        line = json.dumps({"window_epoch_s": list(window_epoch_s) if window_epoch_s else None,
                           "dispatch_lag_ms": dispatch_lag_ms}) + "\n"
        try:
            out, err = self.proc.communicate(line, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        except (BrokenPipeError, OSError, ValueError):
            out, err = "", ""
        try:
            answer = json.loads(out.strip().splitlines()[-1])
            if isinstance(answer, dict):
                return answer
        except (ValueError, IndexError):
            pass
        text = (err or "").strip().splitlines()
        return {"error": f"the meter on {self.server} did not answer ({text[-1] if text else 'no output'})"}


def serve_meter(pids: dict[str, int], interval_s: float = 1.0) -> int:
    """The remote side: meter ``pids`` until one line on stdin, then print the envelope."""
    meter = EmulatorMeter(pids, interval_s)
    meter.start()
    line = sys.stdin.readline()
    if not line.strip():
        meter.stop(None)
        return 0
    try:
        ask = json.loads(line)
        window = ask.get("window_epoch_s")
        lag = ask.get("dispatch_lag_ms")
        envelope = meter.stop((float(window[0]), float(window[1])) if window else None,
                              dispatch_lag_ms=None if lag is None else float(lag))
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        print(f"lab.envelope: bad request {line.strip()[:80]!r}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(envelope), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.envelope",
                                 description="Meter switch processes on this server until a line on stdin, then "
                                             "print their envelope as JSON (a replay across servers runs this on "
                                             "each other server).")
    ap.add_argument("--pids", required=True, help='JSON object {"switch name": pid, ...}')
    ap.add_argument("--interval-s", type=float, default=1.0, help="seconds between samples (default 1)")
    args = ap.parse_args(argv)
    try:
        pids = json.loads(args.pids)
        if not isinstance(pids, dict) or not all(isinstance(v, int) for v in pids.values()):
            raise ValueError("not an object of integer pids")
    except ValueError as exc:
        print(f"lab.envelope: --pids: {exc}", file=sys.stderr)
        return 2
    return serve_meter({str(k): int(v) for k, v in pids.items()}, args.interval_s)


if __name__ == "__main__":
    raise SystemExit(main())
