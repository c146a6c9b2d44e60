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

import math
import os
import threading
from array import array
import time
from pathlib import Path
from typing import Any, Callable

from fabric.system import cpu_ticks
from netkv.stats import percentile

# The envelope, on the 95th percentile of one-second samples.  Calibrated by
# fidelity, not by saturation: on the per-switch emulator, replays whose machine
# p95 stayed at or below 79% kept idle-path transfers within 1.08-1.16x of
# ideal at p90, and replays at 82-90% (scenario hotspots) saw same-server
# transfers, which cross no loaded link, take 1.17-1.88x: CPU contention slows
# packets well before a core is saturated (docs/design.md, "Envelope").
ENVELOPE_CPU_PCT = 80.0  # the busiest switch process, % of one core


ENVELOPE_MACHINE_PCT = 80.0  # the whole machine, % of every core


# Time must keep up too.  Every time stamp of a record is wall-clock time: a
# request dispatched this long after its trace arrival, or a hole this long in
# the meter's once-a-second samples, means the replay's process stood still,
# and every TTFT spanning it carries the stall; the wall clock jumping past the
# monotonic one between two samples means the whole virtual machine was paused
# (its monotonic clock stood still, its wall clock was stepped on afterwards).
# The figures and the replays behind them: docs/design.md, "Envelope".
ENVELOPE_DISPATCH_LAG_MS = 500.0
ENVELOPE_SAMPLE_GAP_S = 3.0
ENVELOPE_CLOCK_JUMP_S = 0.5


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
        """Figures over the samples inside ``window_epoch_s`` (the replay's
        requests: from the replay clock's start, after the workers are up, to
        its end), or over all; the whole series is kept beside them.
        ``dispatch_lag_ms``: the replay's largest dispatch lag, judged too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        n = len(self.t_s)
        t_first = self.t_s[0] if n else time.time()
        judged = [i for i in range(n) if window_epoch_s is None
                  # a sample covers the second before its time stamp
                  or window_epoch_s[0] + self.interval_s <= self.t_s[i] <= window_epoch_s[1]]

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
            "switch_cpu_pct_p95": _round1(p95[busiest]) if busiest else None,
            "switch_cpu_pct_max": _round1(max(per_switch[busiest])) if busiest else None,
            # every switch process together, % of one core
            "switch_cpu_sum_pct_mean": _mean(sum_pct),
            "switch_cpu_sum_pct_p95": _round1(percentile(sum_pct, 95, method="lower")),
            # the whole machine (every core), % of its capacity
            "machine_busy_pct_mean": _mean(machine),
            "machine_busy_pct_p95": _round1(percentile(machine, 95, method="lower")),
            "switch_processes_died": list(self.died),
            "envelope_cpu_pct": ENVELOPE_CPU_PCT,
            "envelope_machine_pct": ENVELOPE_MACHINE_PCT,
            # every sample: [s since the first, switch processes' sum, busiest one, machine busy], judged or not
            "series": [[round(self.t_s[i] - t_first, 2), round(sum(measured(i)), 1),
                        round(max(measured(i), default=0.0), 1),
                        None if math.isnan(self.machine_pct[i]) else round(self.machine_pct[i], 1)]
                       for i in range(n)],
        }
        pairs = list(zip(judged, judged[1:]))
        out["sample_gap_s_max"] = _round1(max((self.t_s[b] - self.t_s[a] for a, b in pairs), default=None))
        out["wall_clock_jump_s_max"] = _round1(max((self.t_s[b] - self.t_s[a] - (self.mono_s[b] - self.mono_s[a])
                                                    for a, b in pairs), default=None))
        if dispatch_lag_ms is not None:
            out["dispatch_lag_ms_max"] = round(float(dispatch_lag_ms), 1)
        out.update(envelope_verdict(out["switch_cpu_pct_p95"], out["machine_busy_pct_p95"], self.died,
                                    sample_gap_s=out["sample_gap_s_max"], clock_jump_s=out["wall_clock_jump_s_max"],
                                    dispatch_lag_ms=dispatch_lag_ms))
        return out


def envelope_verdict(switch_p95: float | None, machine_p95: float | None, died: list[str], *,
                     sample_gap_s: float | None = None, clock_jump_s: float | None = None,
                     dispatch_lag_ms: float | None = None) -> dict[str, Any]:
    """``within_envelope`` (None without samples) and ``limiting_resource``:
    which resource ran out (a switch process died, the busiest switch process,
    the machine's CPU, time itself: the virtual machine paused, seen as the
    wall clock jumping past the monotonic one, or the replay's own process
    stalled, seen as a hole in the meter's samples or a request dispatched
    late), or None."""
    if died:
        return {"within_envelope": False, "limiting_resource": f"switch process died: {', '.join(died)}"}
    stalls = []
    if clock_jump_s is not None and clock_jump_s >= ENVELOPE_CLOCK_JUMP_S:
        stalls.append(f"virtual machine paused (wall clock jumped {clock_jump_s:.1f} s past the monotonic clock)")
    elif sample_gap_s is not None and sample_gap_s >= ENVELOPE_SAMPLE_GAP_S:
        stalls.append(f"replay process stalled (no meter sample for {sample_gap_s:.1f} s)")
    if dispatch_lag_ms is not None and dispatch_lag_ms >= ENVELOPE_DISPATCH_LAG_MS:
        stalls.append(f"replay process stalled (a request dispatched {dispatch_lag_ms:.0f} ms after its arrival)")
    if switch_p95 is None and machine_p95 is None:
        return {"within_envelope": False if stalls else None, "limiting_resource": "; ".join(stalls) or None}
    limits = stalls
    if switch_p95 is not None and switch_p95 >= ENVELOPE_CPU_PCT:
        limits.append(f"switch process CPU (p95 {switch_p95:.0f}% of a core)")
    if machine_p95 is not None and machine_p95 >= ENVELOPE_MACHINE_PCT:
        limits.append(f"machine CPU (p95 {machine_p95:.0f}% busy)")
    return {"within_envelope": not limits, "limiting_resource": "; ".join(limits) or None}


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
