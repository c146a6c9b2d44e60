"""The telemetry oracle: available bandwidth from live per-hop telemetry
(``min over the path's hops of max(capacity - load, floor)``), with the
static estimate as its fallback where a hop has no sample or an old one."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from topologies.model import Hop, Topology

from ..telemetry import LinkSample, TelemetrySnapshot, TelemetrySource
from .base import DEFAULT_MAX_AGE_MS, MIN_AVAILABLE_FRACTION, Estimate, check_size, ms_per_byte
from .paths import PairInfo, PathTable, TransferTable, shared_paths


@dataclass(frozen=True)
class _SourceLayout:
    """The installed paths from one GPU to every GPU, as arrays: row ``k`` is
    ``dsts[k]``; ``hops[k]`` the indices of its directed hops (padded with
    the index of a hop that never limits: infinite bandwidth and age, always
    measured); ``linked[k]`` is False for the source itself."""

    dsts: list[str]
    tier: list[int]
    base_latency_ms: list[float]
    static_ms_per_byte: np.ndarray
    hops: np.ndarray  # (len(dsts), longest path) hop indices
    linked: np.ndarray  # bool


@dataclass(frozen=True)
class _HopState:
    """Every directed hop of the topology under one snapshot, by hop index
    (the last two slots: the padding hop and where unknown hops go)."""

    available_gbps: np.ndarray  # max(capacity - load, floor); inf where unmeasured
    t_s: np.ndarray  # when measured; inf where unmeasured
    measured: np.ndarray  # bool


@dataclass(frozen=True)
class _PairState:
    """A pair's state under one snapshot: usable bandwidth or why not."""

    available_gbps: float | None  # None: fall back to static
    oldest_t_s: float | None  # oldest sample on the path (None if a hop is missing)
    reason: str  # why it falls back ("" when usable)


class TelemetryOracle:
    """Available bandwidth from live per-hop telemetry; static fallback.

    ``max_age_ms=None`` never falls back on age (used to study stale data).
    The source is called at most once per distinct ``now_s`` (and at most once
    every ``refresh_ms`` of ``now_s``), so one scheduling decision that asks
    about many decodes at the same ``now_s`` reads telemetry once."""

    def __init__(
        self,
        topology: Topology,
        source: TelemetrySource,
        max_age_ms: float | None = DEFAULT_MAX_AGE_MS,
        base_latency_ms_by_tier: Mapping[int, float] | None = None,
        *,
        min_available_fraction: float = MIN_AVAILABLE_FRACTION,
        refresh_ms: float = 0.0,
        paths: PathTable | None = None,
    ) -> None:
        """``paths``: a path table computed before (:func:`~netkv.oracle.paths.shared_paths`)."""
        if max_age_ms is not None and not (max_age_ms > 0):
            raise ValueError(f"max_age_ms must be > 0 or None, got {max_age_ms}")
        if not 0 < min_available_fraction <= 1:
            raise ValueError(f"min_available_fraction must be in (0, 1], got {min_available_fraction}")
        if not (refresh_ms >= 0):
            raise ValueError(f"refresh_ms must be >= 0, got {refresh_ms}")
        self.paths = shared_paths(topology, paths, base_latency_ms_by_tier)
        self.source = source
        self.max_age_ms = max_age_ms
        self.min_available_fraction = min_available_fraction
        self.refresh_ms = refresh_ms
        self.fetches = 0  # how many times the source was read
        self._fetched_at_s: float | None = None
        self._snapshot: TelemetrySnapshot | None = None
        self._state: dict[tuple[str, str], _PairState] = {}
        self._snapshot_epoch = 0
        self._tables: dict[str, TransferTable] = {}
        self._hop_index: dict[Hop, int] = {}
        for link in topology.links:
            for hop in ((link.a, link.b), (link.b, link.a)):
                self._hop_index.setdefault(hop, len(self._hop_index))
        self._layouts: dict[str, _SourceLayout] = {}
        self._destinations: list[str] | None = None  # what a layout covers (None: every GPU); see warm
        self._hop_state: tuple[int, _HopState] | None = None  # (snapshot epoch, state)
        # see prepare(): (snapshot, its hop figures, tables of the sources in use)
        self._prepared: tuple[TelemetrySnapshot, _HopState, dict[str, TransferTable]] | None = None
        self._sources_in_use: set[str] = set()  # sources a decision has asked for a table
        self._capacity: dict[Hop, float] = {}  # hops re-rated or down (PathTable.capacity_overrides)
        self._faults_epoch = 0  # set_link calls so far: a prepare() that straddles one is dropped

    def set_link(self, a: str, b: str, *, up: bool | None = None, rate_gbps: float | None = None) -> None:
        """A link fault (see :meth:`PathTable.set_link`).  From now on the hop's
        capacity is the new rate (a down link: DOWN_LINK_GBPS) whatever the
        telemetry sample says, and its available bandwidth is that capacity
        minus the measured load; routes avoid down links like the controller's.
        Every cached figure is dropped; call it from the thread that decides."""
        self.paths.set_link(a, b, up=up, rate_gbps=rate_gbps)
        self._capacity = self.paths.capacity_overrides()
        self._faults_epoch += 1
        self._state = {}
        self._tables = {}
        self._layouts = {}
        self._hop_state = None
        self._prepared = None

    def tier(self, src: str, dst: str) -> int:
        return self.paths.get(src, dst).tier

    # -- telemetry ---------------------------------------------------------------
    def _read_source(self, now_s: float) -> TelemetrySnapshot:
        return self.source()

    def snapshot(self, now_s: float) -> TelemetrySnapshot:
        last = self._fetched_at_s
        if (
            self._snapshot is None
            or last is None
            or (now_s != last and (now_s < last or (now_s - last) * 1000.0 >= self.refresh_ms))
        ):
            snap = self._read_source(now_s)
            self.fetches += 1
            self._fetched_at_s = now_s
            if snap is not self._snapshot:
                self._snapshot = snap
                self._state = {}
                self._snapshot_epoch += 1
                self._tables = {}
        assert self._snapshot is not None
        return self._snapshot

    def _pair_state(self, info: PairInfo, key: tuple[str, str], snap: TelemetrySnapshot) -> _PairState:
        state = self._state.get(key)
        if state is not None:
            return state
        samples = snap.samples
        frac = self.min_available_fraction
        capacity = self._capacity
        available = math.inf
        oldest = math.inf
        for hop in info.hops:
            s: LinkSample | None = samples.get(hop)
            if s is None:
                state = _PairState(None, None, f"no telemetry for hop {hop[0]}->{hop[1]}")
                break
            cap = capacity.get(hop, s.capacity_gbps) if capacity else s.capacity_gbps
            free = cap - s.load_gbps
            floor = frac * cap
            if free < floor:
                free = floor
            if free < available:
                available = free
            if s.t_s < oldest:
                oldest = s.t_s
        else:
            state = _PairState(available, oldest, "")
        self._state[key] = state
        return state

    def hop_available_gbps(self, hop: Hop, now_s: float) -> float | None:
        """Available bandwidth of one directed hop in the snapshot of ``now_s``
        (``max(capacity - load, floor)``, as for a path), or None without a sample."""
        s = self.snapshot(now_s).samples.get(hop)
        if s is None:
            return None
        free = s.capacity_gbps - s.load_gbps
        floor = self.min_available_fraction * s.capacity_gbps
        return free if free >= floor else floor

    # -- answers -------------------------------------------------------------------
    def _resolve(self, src: str, dst: str, now_s: float) -> tuple[PairInfo, float | None, float | None, str]:
        """(pair, available_gbps or None for fallback, age_ms, reason)."""
        info = self.paths.get(src, dst)
        if not info.hops:
            return info, None, None, "same GPU: no link crossed"
        snap = self.snapshot(now_s)
        state = self._pair_state(info, (src, dst), snap)
        if state.oldest_t_s is None:
            return info, None, None, state.reason
        age_ms = (now_s - state.oldest_t_s) * 1000.0
        if age_ms < 0:
            age_ms = 0.0  # sample stamped after now_s (clock skew): treat as fresh
        if self.max_age_ms is not None and age_ms > self.max_age_ms:
            return info, None, age_ms, f"telemetry {age_ms:.1f} ms old > max_age_ms {self.max_age_ms:g}"
        return info, state.available_gbps, age_ms, ""

    def transfer_model(self, src: str, dst: str, now_s: float) -> tuple[int, float, float]:
        info, available, _, _ = self._resolve(src, dst, now_s)
        if available is None:
            return info.tier, info.base_latency_ms, info.static_ms_per_byte
        return info.tier, info.base_latency_ms, ms_per_byte(available)

    def transfer_table(self, src: str, now_s: float) -> TransferTable:
        """Per-destination transfer models for ``src`` at ``now_s``; reused
        across calls while the snapshot is unchanged and no sample used has
        aged past ``max_age_ms``."""
        self.snapshot(now_s)
        table = self._tables.get(src)
        if table is None or now_s < table.created_s or now_s > table.valid_until_s:
            table = self._tables[src] = self._new_table(src, now_s)
        table.now_s = now_s
        return table

    # The table of one source is computed for every GPU at once with numpy:
    # per snapshot, one pass over its samples gives every hop's available
    # bandwidth and time (shared by all sources); per source, a gather over
    # its path-hop matrix and a row minimum give each destination's.  The
    # arithmetic is the one of ``_pair_state`` and ``_resolve`` element by
    # element (same operations, same order, IEEE doubles), so the table holds
    # exactly what ``transfer_model`` answers at ``now_s``.
    def _layout(self, src: str) -> _SourceLayout:
        lay = self._layouts.get(src)
        if lay is None:
            dsts = self._destinations or self.paths.topology.gpu_names()
            infos = [self.paths.get(src, dst) for dst in dsts]
            pad = len(self._hop_index)
            width = max([len(info.hops) for info in infos] + [1])
            hops = np.full((len(dsts), width), pad, dtype=np.intp)
            for k, info in enumerate(infos):
                if info.hops:
                    hops[k, :len(info.hops)] = [self._hop_index[h] for h in info.hops]
            lay = self._layouts[src] = _SourceLayout(
                dsts, [info.tier for info in infos], [info.base_latency_ms for info in infos],
                np.array([info.static_ms_per_byte for info in infos], dtype=np.float64), hops,
                np.array([bool(info.hops) for info in infos]),
            )
        return lay

    def warm(self, sources: Iterable[str], destinations: Iterable[str] | None = None) -> None:
        """Compute the installed paths from each of ``sources`` to every GPU
        (or to ``destinations`` only: the decode instances, whose entries
        every decision reads; any other is computed on its first lookup, so
        at 1,024 GPUs each snapshot's tables hold half the entries)
        and their hop matrix now (a router's start-up work), not on the first
        decision from each source, and have :meth:`prepare` build their
        transfer tables with every snapshot from now on.  Without the second
        part the first decision from each source built its own table: in the
        one-minute replays of the long-context experiment that was 15-18 of
        about 210 decisions, at a median 290-480 us each: the decision time's tail."""
        if destinations is not None and self._destinations is None:
            self._destinations = list(destinations)
            self._layouts.clear()
        for src in sources:
            self._layout(src)
            self._sources_in_use.add(src)

    def prepare(self, snapshot: TelemetrySnapshot, now_s: float | None = None) -> None:
        """The per-hop figures of ``snapshot`` and the transfer table of every
        source decisions have asked about, computed ahead of their first use.

        For a telemetry poller to call from its own thread with each new
        snapshot before its source hands it out, so that a refresh is not on
        a decision's path.  It reads the snapshot and sets one reference
        (``now_s``, default the wall clock, is the tables' creation time).  A
        decision that meets the same snapshot object at a time its table is
        valid for (``created_s <= now_s <= valid_until_s``: a sample stale at
        creation is stale later, and the table expires when its first fresh
        one ages out) uses the prepared table, which then holds what it would
        have computed; otherwise it computes as usual."""
        now = time.time() if now_s is None else now_s
        epoch = self._faults_epoch
        hops = self._hop_figures(snapshot)
        tables = {src: self._table_from(src, hops, now) for src in list(self._sources_in_use)}
        if epoch == self._faults_epoch:
            self._prepared = (snapshot, hops, tables)

    def _hops_now(self, snap: TelemetrySnapshot) -> _HopState:
        if self._hop_state is not None and self._hop_state[0] == self._snapshot_epoch:
            return self._hop_state[1]
        prepared = self._prepared
        state = prepared[1] if prepared is not None and prepared[0] is snap else self._hop_figures(snap)
        self._hop_state = (self._snapshot_epoch, state)
        return state

    def _hop_figures(self, snap: TelemetrySnapshot) -> _HopState:
        n = len(self._hop_index)
        index = self._hop_index.get
        cap = self._capacity
        rows = [(index(hop, n + 1), cap.get(hop, s.capacity_gbps) if cap else s.capacity_gbps, s.load_gbps, s.t_s)
                for hop, s in snap.samples.items()]
        available = np.full(n + 2, math.inf)
        t_s = np.full(n + 2, math.inf)
        measured = np.zeros(n + 2, dtype=bool)
        if rows:
            cols = np.array(rows, dtype=np.float64)
            at = cols[:, 0].astype(np.intp)
            capacity = cols[:, 1]
            available[at] = np.maximum(capacity - cols[:, 2], self.min_available_fraction * capacity)
            t_s[at] = cols[:, 3]
            measured[at] = True
        available[n] = t_s[n] = math.inf  # the padding hop (unknown hops may have landed on n + 1)
        measured[n] = True
        return _HopState(available, t_s, measured)

    def _new_table(self, src: str, now_s: float) -> TransferTable:
        snap = self.snapshot(now_s)
        prepared = self._prepared
        if prepared is not None and prepared[0] is snap:
            table = prepared[2].get(src)
            if table is not None and table.created_s <= now_s <= table.valid_until_s:
                return table
        self._sources_in_use.add(src)
        return self._table_from(src, self._hops_now(snap), now_s)

    def _table_from(self, src: str, hs: _HopState, now_s: float) -> TransferTable:
        lay = self._layout(src)
        available = hs.available_gbps[lay.hops].min(axis=1)
        oldest = hs.t_s[lay.hops].min(axis=1)
        usable = hs.measured[lay.hops].all(axis=1) & lay.linked
        if self.max_age_ms is not None:
            # _resolve: a negative age counts as 0, which never exceeds max_age_ms > 0
            usable &= ~((now_s - oldest) * 1000.0 > self.max_age_ms)
        mpb = np.where(usable, 8.0 / (available * 1e6), lay.static_ms_per_byte)  # available > 0: the floor
        table = TransferTable(lambda dst: self.transfer_model(src, dst, table.now_s), now_s)
        table.update(zip(lay.dsts, zip(lay.tier, lay.base_latency_ms, mpb.tolist())))
        if self.max_age_ms is not None and usable.any():
            table.valid_until_s = float((oldest[usable] + self.max_age_ms / 1000.0).min())
        return table

    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate:
        check_size(size_bytes)
        info, available, age_ms, reason = self._resolve(src, dst, now_s)
        if available is None:
            return Estimate(
                transfer_ms=info.base_latency_ms + size_bytes * info.static_ms_per_byte,
                available_gbps=info.bottleneck_gbps, base_latency_ms=info.base_latency_ms,
                tier=info.tier, hops=len(info.hops), telemetry_age_ms=age_ms,
                source="static" if not info.hops else "static-fallback", reason=reason,
            )
        return Estimate(
            transfer_ms=info.base_latency_ms + size_bytes * ms_per_byte(available),
            available_gbps=available, base_latency_ms=info.base_latency_ms, tier=info.tier,
            hops=len(info.hops), telemetry_age_ms=age_ms, source="telemetry",
        )
