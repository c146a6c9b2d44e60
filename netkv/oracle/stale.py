"""The stale oracle: a telemetry oracle that sees every hop as it was
``delay_ms`` earlier (:class:`DelayedSource` keeps the history), to study
decisions on stale telemetry."""

from __future__ import annotations

import bisect
import math
import time
from typing import Callable, Mapping

from topologies.model import Hop, Topology

from ..telemetry import LinkSample, TelemetrySnapshot, TelemetrySource
from .base import MIN_AVAILABLE_FRACTION
from .paths import PathTable
from .telemetry import TelemetryOracle


class DelayedSource:
    """Replays a telemetry source ``delay_ms`` late.

    Every read of the inner source is recorded per hop, keyed by the samples'
    own ``t_s``; :meth:`at` returns, for each hop, the newest sample measured
    at or before ``now_s - delay_ms``.  Hops with no sample that old are left
    out (the oracle then falls back to static for paths using them).  Used as a
    plain :data:`TelemetrySource` it reads the time from ``clock``."""

    def __init__(self, source: TelemetrySource, delay_ms: float, clock: Callable[[], float] = time.time) -> None:
        if not (delay_ms >= 0 and math.isfinite(delay_ms)):
            raise ValueError(f"delay_ms must be finite and >= 0, got {delay_ms}")
        self.source = source
        self.delay_ms = delay_ms
        self.clock = clock
        self._times: dict[Hop, list[float]] = {}
        self._samples: dict[Hop, list[LinkSample]] = {}
        self._last_snapshot: TelemetrySnapshot | None = None

    def ingest(self, snap: TelemetrySnapshot) -> None:
        for hop, s in snap.samples.items():
            times = self._times.get(hop)
            if times is None:
                self._times[hop] = [s.t_s]
                self._samples[hop] = [s]
            elif s.t_s > times[-1]:
                times.append(s.t_s)
                self._samples[hop].append(s)
            elif s.t_s < times[-1]:
                i = bisect.bisect_left(times, s.t_s)
                if i == len(times) or times[i] != s.t_s:
                    times.insert(i, s.t_s)
                    self._samples[hop].insert(i, s)

    def at(self, now_s: float) -> TelemetrySnapshot:
        snap = self.source()
        if snap is not self._last_snapshot:
            self.ingest(snap)
            self._last_snapshot = snap
        cutoff = now_s - self.delay_ms / 1000.0
        out: dict[Hop, LinkSample] = {}
        for hop, times in self._times.items():
            i = bisect.bisect_right(times, cutoff)
            if i == 0:
                continue
            out[hop] = self._samples[hop][i - 1]
            if i > 64:  # drop history nobody can ask for again (time only moves on)
                del times[: i - 1]
                del self._samples[hop][: i - 1]
        return TelemetrySnapshot(out)

    def __call__(self) -> TelemetrySnapshot:
        return self.at(self.clock())


class StaleOracle(TelemetryOracle):
    """A :class:`TelemetryOracle` reading telemetry ``delay_ms`` old.

    ``max_age_ms`` defaults to None here so the stale figures are used rather
    than rejected; pass a number to study the fallback instead."""

    def __init__(
        self,
        topology: Topology,
        source: TelemetrySource,
        delay_ms: float,
        max_age_ms: float | None = None,
        base_latency_ms_by_tier: Mapping[int, float] | None = None,
        *,
        min_available_fraction: float = MIN_AVAILABLE_FRACTION,
        paths: PathTable | None = None,
    ) -> None:
        self.delayed = DelayedSource(source, delay_ms)
        super().__init__(
            topology, self.delayed, max_age_ms, base_latency_ms_by_tier,
            min_available_fraction=min_available_fraction, paths=paths,
        )

    def _read_source(self, now_s: float) -> TelemetrySnapshot:
        return self.delayed.at(now_s)
