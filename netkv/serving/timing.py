"""Timing a scheduling decision, and giving it the CPU.

A decision's record says how long it took (wall and thread CPU time) and what
else that time held (collections, context switches): :class:`DecisionTimer`
with :class:`GcClock`.  :class:`DecisionPriority` runs each decision at
real-time priority where the engine shares its cores with the emulated fabric
(docs/schedulers.md, "Decision time").
"""

from __future__ import annotations

import gc
import os
import resource
import time
from typing import Any


class GcClock:
    """Wall time CPython's cyclic garbage collector has run in this process
    since :meth:`start` (``gc.callbacks``), so that a decision's record can
    say how much of its time was a collection's pause rather than its own."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._began: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.total_s += time.perf_counter() - self._began
            self._began = None

    def start(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)


class DecisionTimer:
    """Times one scheduling decision from its construction to :meth:`fields`:
    wall and thread CPU time (their difference is time the thread was off the
    CPU), and what else the wall time held: collections, and the thread's
    context switches (involuntary: the kernel gave the CPU to another process;
    voluntary: it blocked, as on the interpreter lock another thread held)."""

    def __init__(self, gc_clock: GcClock) -> None:
        self.gc_clock = gc_clock
        self.gc_before_s = gc_clock.total_s
        self.usage = resource.getrusage(resource.RUSAGE_THREAD)
        self.cpu_started = time.thread_time()
        self.started = time.perf_counter()

    def fields(self) -> dict[str, Any]:
        """The record's decision_* fields, as of now."""
        wall_us = (time.perf_counter() - self.started) * 1e6
        cpu_us = (time.thread_time() - self.cpu_started) * 1e6
        now = resource.getrusage(resource.RUSAGE_THREAD)
        return {"decision_us": wall_us, "decision_cpu_us": cpu_us,
                "decision_gc_us": (self.gc_clock.total_s - self.gc_before_s) * 1e6,
                "decision_preemptions": now.ru_nivcsw - self.usage.ru_nivcsw,
                "decision_waits": now.ru_nvcsw - self.usage.ru_nvcsw}


class DecisionPriority:
    """Runs each decode decision at real-time priority (SCHED_FIFO at its
    lowest level) and gives the frontend's thread its normal scheduling back
    after it.

    Here the router shares two cores with the emulated fabric: switch
    processes, workers and the kernel's htb and veth work.  A production router
    has its own host, so a switch process preempting a decision is the
    emulator's cost, not the scheduler's; it was what held NetKV's decision p99
    above 0.5 ms in a long replay (docs/schedulers.md).  At SCHED_FIFO no
    normal process preempts the decision; the hypervisor still can (steal).
    The two system calls cost about 2 us per decision, outside the timed part.
    Setting it needs CAP_SYS_NICE: without it, decisions run at normal
    priority and :attr:`applied` is false (the summary's ``decision_realtime``)."""

    def __init__(self, wanted: str) -> None:
        self.applied = False
        self.refusal = ""  # why real time was wanted and not applied
        if wanted != "realtime":
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            self.applied = True
        except OSError as exc:
            self.refusal = f"cannot run decisions at SCHED_FIFO ({exc.strerror}); they run at normal priority"

    def __enter__(self) -> "DecisionPriority":
        if self.applied:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.applied:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
