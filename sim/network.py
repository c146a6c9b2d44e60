"""Moving bytes over the simulated platform, on a simulated clock.

:class:`Simulation` runs one SimGrid actor, the driver, which owns every
transfer and a heap of timed callbacks (the serving model's events: arrivals,
prefill ends, decode iterations, telemetry polls).  The driver runs every
callback that is due, then lets SimGrid advance the clock to the next one or
to the first transfer that ends before it (``Comm.wait_any_for``), whichever
comes first; a transfer's end calls its ``on_done``.  So the serving model runs
as plain Python between two instants of simulated time, and SimGrid is only
the network: ``transfer(src, dst, nbytes, on_done)`` is "move these bytes from
GPU a to GPU b and tell me when they arrive".

Each transfer has a waiter: a SimGrid actor of its own that waits on the
transfer's comm alone and, when it ends, hands it to the driver and wakes it
(a semaphore the driver sleeps on, with the next callback's time as its
timeout).  The driver used to wait on every transfer in flight at once
(``Comm.wait_any_for``), which costs the number in flight at every callback:
at 4,096 GPUs under a load-only pick that was thousands of comms at each of
millions of decode steps, most of the replay's time.  With the waiters a
callback costs one semaphore wait, and a transfer's end one actor's wake-up.

Telemetry: every transfer's bytes are counted on each directed hop of its
route (from SimGrid's remaining bytes, read at every sample and at its end),
and :meth:`Simulation.sample` turns the bytes of the interval since the last
sample into one :class:`netkv.telemetry.LinkSample` per directed hop, the
average load over the interval, as the controller reads its port counters.

An empty payload moves one byte: SimGrid 3.32 never starts a comm of size 0.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Any, Callable

from netkv.telemetry import LinkSample, TelemetrySnapshot
from topologies import Hop

from .platform import Platform

EPSILON_S = 1e-9  # callbacks due within this of the clock run now


class SimulationError(RuntimeError):
    """The simulation could not run (a callback raised, or SimGrid failed)."""


class Transfer:
    """One flow on the platform: ``start_s``/``end_s`` in simulated seconds."""

    __slots__ = ("src", "dst", "nbytes", "hops", "comm", "start_s", "end_s", "on_done", "counted", "tag")

    def __init__(self, src: str, dst: str, nbytes: int, hops: list[Hop], start_s: float,
                 on_done: Callable[["Transfer"], None] | None, tag: Any = None) -> None:
        self.src = src
        self.dst = dst
        self.nbytes = nbytes
        self.hops = hops
        self.comm: Any = None
        self.start_s = start_s
        self.end_s: float | None = None
        self.on_done = on_done
        self.counted = float(max(1, nbytes))  # bytes not yet credited to the hops' counters
        self.tag = tag


class Simulation:
    def __init__(self, platform: Platform) -> None:
        import simgrid as sg

        self._sg = sg
        self.platform = platform
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._active: dict[Transfer, None] = {}  # in start order
        self._done: deque[Transfer] = deque()  # ended, handed over by their waiters, not yet completed
        self._wake = sg.Semaphore(0)  # a waiter releases it when it hands a transfer over
        self._hop_bytes: dict[Hop, float] = {}
        self._last_sample_s = 0.0
        self._stopping = False
        self.error: BaseException | None = None
        self.transfers_started = 0
        self.transfers_done = 0
        self.callbacks_run = 0

    # -- time ------------------------------------------------------------------------------
    @property
    def now(self) -> float:
        """Simulated seconds since the simulation began."""
        return float(self._sg.Engine.clock)

    def at(self, t_s: float, fn: Callable[[], None]) -> None:
        """Call ``fn()`` at simulated time ``t_s`` (now, if that is past)."""
        heapq.heappush(self._heap, (t_s, next(self._seq), fn))

    def stop(self) -> None:
        """End the simulation once the current callback returns: transfers in
        flight are cancelled and callbacks not yet due are dropped."""
        self._stopping = True

    # -- transfers -----------------------------------------------------------------------------
    def transfer(self, src: str, dst: str, nbytes: int, on_done: Callable[[Transfer], None] | None = None, *,
                 hops_of: tuple[str, str] | None = None, tag: Any = None) -> Transfer:
        """Start moving ``nbytes`` from host ``src`` to host ``dst`` now;
        ``on_done(transfer)`` is called when the last byte arrives.  The bytes
        are counted on the hops of ``hops_of`` (default (src, dst))."""
        hops = self.platform.hops(*(hops_of or (src, dst)))
        xfer = Transfer(src, dst, nbytes, hops, self.now, on_done, tag)
        hosts = self.platform.hosts
        xfer.comm = self._sg.Comm.sendto_async(hosts[src], hosts[dst], max(1, int(nbytes)))
        self._active[xfer] = None
        self.transfers_started += 1
        self._sg.Actor.create(f"x{self.transfers_started}", hosts[src], self._waiter, xfer)
        return xfer

    def _waiter(self, xfer: Transfer) -> None:
        """The actor of one transfer: waits for its last byte, then hands it to the driver."""
        try:
            xfer.comm.wait()
        except Exception:  # noqa: BLE001 - cancelled (a background flow's end, or the simulation's)
            return
        self._done.append(xfer)
        self._wake.release()

    def cancel(self, xfer: Transfer) -> None:
        """End a transfer before its last byte (a background flow's end)."""
        if xfer.end_s is not None or xfer not in self._active:
            return
        self._credit(xfer)
        del self._active[xfer]
        xfer.comm.cancel()
        xfer.end_s = self.now

    @property
    def active(self) -> list[Transfer]:
        return list(self._active)

    # -- telemetry -----------------------------------------------------------------------------
    def _credit(self, xfer: Transfer, remaining: float | None = None) -> None:
        left = float(xfer.comm.remaining) if remaining is None else remaining
        moved = xfer.counted - left
        if moved > 0:
            for hop in xfer.hops:
                self._hop_bytes[hop] = self._hop_bytes.get(hop, 0.0) + moved
            xfer.counted = left

    def sample(self, t_s: float) -> TelemetrySnapshot:
        """Every directed hop's average load since the previous sample, as
        measured at ``t_s`` (the samples' time stamp: epoch seconds)."""
        for xfer in self._active:
            self._credit(xfer)
        now = self.now
        interval = now - self._last_sample_s
        self._last_sample_s = now
        samples = []
        for hop, capacity in self.platform.capacity_gbps.items():
            moved = self._hop_bytes.get(hop, 0.0)
            load = moved * 8 / interval / 1e9 if interval > 0 else 0.0
            samples.append(LinkSample(hop[0], hop[1], t_s, load, capacity, load / capacity))
        self._hop_bytes = {}
        return TelemetrySnapshot({s.key: s for s in samples})

    # -- the driver ------------------------------------------------------------------------------
    def run(self) -> None:
        """Run until :meth:`stop`, or until nothing is left to do.  A callback
        that raises ends the simulation, and the error is raised here."""
        sg = self._sg
        host = next(iter(self.platform.hosts.values()))
        sg.Actor.create("driver", host, self._drive)
        self.platform.engine.run()
        if self.error is not None:
            raise self.error

    def _drive(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - an uncaught exception would abort the process
            self.error = exc
        active, self._active = list(self._active), {}
        for xfer in active:  # their waiters return
            try:
                xfer.comm.cancel()
            except Exception:  # noqa: BLE001 - already over
                pass

    def _complete(self, xfer: Transfer) -> None:
        if xfer not in self._active:  # cancelled after its last byte, before the driver woke
            return
        del self._active[xfer]
        self._credit(xfer, 0.0)
        xfer.end_s = self.now
        self.transfers_done += 1
        if xfer.on_done is not None:
            xfer.on_done(xfer)

    def _loop(self) -> None:
        heap, done = self._heap, self._done
        stuck = False  # SimGrid did not move its clock towards the next callback: run it now
        while not self._stopping:
            now = self.now
            busy = True
            while busy and not self._stopping:  # everything due now: callbacks, then ended transfers
                busy = False
                while heap and (heap[0][0] <= now + EPSILON_S or stuck) and not self._stopping:
                    fn = heapq.heappop(heap)[2]
                    stuck = False
                    fn()
                    self.callbacks_run += 1
                    busy = True
                while done and not self._stopping:
                    self._complete(done.popleft())
                    busy = True
            if self._stopping or (not self._active and not heap):
                break
            if heap:
                timed_out = self._wake.acquire_timeout(max(0.0, heap[0][0] - now))
                stuck = timed_out and self.now <= now  # else the next callback is due, or a transfer ended
            else:
                self._wake.acquire()
