"""Every replay judged again, from its saved samples, under today's rule.

A replay's ``envelope.json`` holds the verdict made when it ran, and beside it
the meter's whole series.  :func:`rejudge` applies the current rule
(:func:`envelope_verdict`) to that series again, so that a run
made before a check existed is judged by it now, and ``netkv report`` says
where the stored verdict differs.  What cannot be judged is never counted as
inside: a replay without ``envelope.json``, or without samples, has the
verdict None ("unjudged"), and campaigns leave it out of their headline.

Since December 2026 the meter saves what an exact re-judgement needs: the
wall-clock time of its first sample and of the judged window, the monotonic
time of every sample and each switch process's own series.  Older files have
only times relative to the first sample, the per-sample sum and maximum over
the switch processes, and the machine's figure; for them the judged window is
their last ``samples`` samples (the meter stopped at the window's end), the
busiest switch process's p95 is the stored one (same rule), and a pause
shorter than a sample gap cannot be seen without the monotonic clock:
``checks_missing`` says so.

Both ways, the stall and pause checks also look at the two sample pairs that
straddle the window's edges: a hole that begins before the replay's first
request and ends inside it is a stall of the replay.

A replay of the simulator engine (``netkv simulate``; its envelope.json says
``"engine": "simulate"``) has no emulator envelope to leave: no switch
process, no shared CPU, and its time stamps are a simulated clock's, which
cannot stall.  It is judged inside, with ``limiting_resource`` None and a
``note`` saying why, so that campaigns and reports count it like an emulated
replay judged inside.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from lab.rundir import read_json
from netkv.stats import percentile

UNJUDGED = "unjudged"
SIMULATED_NOTE = ("simulated replay (engine simulate): SimGrid's flow-level network on a simulated clock has no "
                  "emulator envelope, so it is judged inside")

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


def _p95(values: Sequence[float]) -> float | None:
    value = percentile(values, 95, method="lower")
    return None if value is None else round(value, 1)


def _edges(times: Sequence[float], first: int, last: int) -> list[tuple[int, int]]:
    """Consecutive sample pairs from the one before ``first`` to the one after
    ``last`` (indices into ``times``, clipped to the series)."""
    lo, hi = max(0, first - 1), min(len(times) - 1, last + 1)
    return [(i, i + 1) for i in range(lo, hi)]


def rejudge(envelope: dict[str, Any] | None, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """The verdict under the current rule: ``within_envelope`` (True, False or
    None for unjudged), ``limiting_resource``, ``checks_missing`` (what the
    saved data cannot show) and the figures it was judged on.  A simulated
    replay (``"engine": "simulate"``) is inside, with a ``note``."""
    if not envelope:
        return {"within_envelope": None, "limiting_resource": "no envelope.json: the replay was not judged",
                "checks_missing": ["everything"]}
    if envelope.get("engine") == "simulate":
        return {"within_envelope": True, "limiting_resource": None, "checks_missing": [], "note": SIMULATED_NOTE,
                "switch_cpu_pct_p95": None, "machine_busy_pct_p95": None, "sample_gap_s_max": None,
                "wall_clock_jump_s_max": None}
    series = envelope.get("series") or []
    lag = (summary or {}).get("max_dispatch_lag_ms", envelope.get("dispatch_lag_ms_max"))
    died = list(envelope.get("switch_processes_died") or [])
    missing: list[str] = []
    if "window_epoch_s" in envelope and "series_start_epoch_s" in envelope and "switch_series" in envelope:
        t0 = float(envelope["series_start_epoch_s"])
        start, end = (float(v) for v in envelope["window_epoch_s"])
        interval = float(envelope.get("interval_s", 1.0))
        times = [t0 + float(r[0]) for r in series]
        judged = [i for i, t in enumerate(times) if start + interval <= t <= end]
        per_switch = {name: [float(v) for i in judged if (v := column[i]) is not None]
                      for name, column in envelope["switch_series"].items()}
        p95s = {name: _p95(v) for name, v in per_switch.items() if v}
        switch_p95 = max((v for v in p95s.values() if v is not None), default=None)
        machine_p95 = _p95([float(series[i][3]) for i in judged if series[i][3] is not None])
        first = next((i for i, t in enumerate(times) if t > start), len(times))
        last = max((i for i, t in enumerate(times) if t - interval < end), default=-1)
        pairs = _edges(times, first, last) if first <= last else []
        gap = max((times[b] - times[a] for a, b in pairs), default=None)
        jump = max((times[b] - times[a] - (float(series[b][4]) - float(series[a][4])) for a, b in pairs),
                   default=None)
    else:
        judged_n = int(envelope.get("samples") or 0)
        if judged_n == 0 or not series:
            verdict = envelope_verdict(None, None, died, dispatch_lag_ms=None if lag is None else float(lag))
            if verdict["within_envelope"] is None:
                verdict["limiting_resource"] = "no samples: the replay was not judged"
            return {**verdict, "checks_missing": ["switch and machine CPU", "stalls", "pauses"]}
        # the meter stopped at the window's end: its judged samples are the series' last ones
        first, last = len(series) - min(judged_n, len(series)), len(series) - 1
        times = [float(r[0]) for r in series]
        switch_p95 = envelope.get("switch_cpu_pct_p95")
        machine_p95 = envelope.get("machine_busy_pct_p95")
        pairs = _edges(times, first, last)
        gap = max((times[b] - times[a] for a, b in pairs), default=None)
        jump = envelope.get("wall_clock_jump_s_max")
        if jump is None:
            missing.append("pauses shorter than a sample gap (no monotonic clock saved)")
    verdict = envelope_verdict(switch_p95, machine_p95, died,
                               sample_gap_s=None if gap is None else round(gap, 1),
                               clock_jump_s=None if jump is None else round(jump, 1),
                               dispatch_lag_ms=None if lag is None else float(lag))
    verdict.update(checks_missing=missing, switch_cpu_pct_p95=switch_p95, machine_busy_pct_p95=machine_p95,
                   sample_gap_s_max=None if gap is None else round(gap, 1),
                   wall_clock_jump_s_max=None if jump is None else round(jump, 1))
    return verdict


def judge_replay(run_dir: Path) -> dict[str, Any]:
    """A replay directory judged again; ``stored`` is the verdict it was given
    when it ran (None without one) and ``changed`` whether the two differ."""
    envelope = read_json(run_dir / "envelope.json")
    verdict = rejudge(envelope, read_json(run_dir / "summary.json"))
    stored = None if envelope is None else envelope.get("within_envelope")
    verdict["stored_within_envelope"] = stored
    verdict["changed"] = stored is not verdict["within_envelope"] and not (
        stored is None and verdict["within_envelope"] is None)
    return verdict


def inside(verdict: dict[str, Any] | None) -> bool:
    """Only a replay judged inside counts as inside; unjudged is not."""
    return verdict is not None and verdict.get("within_envelope") is True


def describe(verdict: dict[str, Any]) -> str:
    if verdict.get("within_envelope") is True:
        return "inside"
    if verdict.get("within_envelope") is None:
        return f"{UNJUDGED} ({verdict.get('limiting_resource')})"
    return f"OUTSIDE ({verdict.get('limiting_resource')})"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
