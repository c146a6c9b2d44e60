"""Clock benchmark: how far the thread CPU clock runs ahead of the wall clock.

Every record's ``decision_cpu_us`` (``time.thread_time``) is read around the
same call as ``decision_us`` (``time.perf_counter``), so CPU time should never
exceed wall time.  On a virtual machine the kernel's per-thread CPU accounting
and the wall clock come from different sources, and the CPU figure is now and
then ahead.  ``python -m bench clocks`` times ``--intervals`` short busy loops
(about ``--work-us`` of CPU each) with both clocks, read in the same nesting as
the frontend reads them, and prints how many were ahead by more than
``--threshold-us`` and by how much at most.  No root needed.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time


def busy_loop(iterations: int) -> int:
    total = 0
    for j in range(iterations):
        total += j
    return total


def iterations_for(work_us: float) -> int:
    """Loop iterations that take about ``work_us`` of CPU on this machine."""
    n = 10_000
    started = time.thread_time()
    busy_loop(n)
    per_iteration_us = max((time.thread_time() - started) * 1e6 / n, 1e-3)
    return max(1, int(work_us / per_iteration_us))


def measure(intervals: int, work_us: float, threshold_us: float) -> dict[str, float | int]:
    iterations = iterations_for(work_us)
    ahead_us: list[float] = []
    wall_total_us = 0.0
    for _ in range(intervals):
        cpu_started = time.thread_time()
        started = time.perf_counter()
        busy_loop(iterations)
        wall_us = (time.perf_counter() - started) * 1e6
        cpu_us = (time.thread_time() - cpu_started) * 1e6
        wall_total_us += wall_us
        if cpu_us - wall_us > threshold_us:
            ahead_us.append(cpu_us - wall_us)
    return {
        "intervals": intervals,
        "interval_wall_us_mean": round(wall_total_us / intervals, 1),
        "threshold_us": threshold_us,
        "cpu_ahead_count": len(ahead_us),
        "cpu_ahead_per_10k": round(len(ahead_us) * 1e4 / intervals, 2),
        "cpu_ahead_us_max": round(max(ahead_us), 1) if ahead_us else 0.0,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench clocks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals", type=int, default=200_000, help="busy intervals to time (default 200000)")
    ap.add_argument("--work-us", type=float, default=40.0, help="CPU time of each interval, us (default 40)")
    ap.add_argument("--threshold-us", type=float, default=20.0,
                    help="count intervals whose CPU time exceeds wall time by more than this (default 20)")
    args = ap.parse_args(argv)
    if args.intervals < 1 or not args.work_us > 0 or not args.threshold_us >= 0:
        ap.error("--intervals must be >= 1, --work-us > 0 and --threshold-us >= 0")
    print(json.dumps(measure(args.intervals, args.work_us, args.threshold_us)))
    return 0
