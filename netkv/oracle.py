"""Network cost oracle: estimated KV-transfer time for a prefill/decode pair.

Every oracle answers ``estimate(src, dst, size_bytes, now_s)`` with an
:class:`Estimate` whose transfer time is linear in the payload::

    transfer_ms = base_latency_ms[tier] + size_bytes * 8 / (available_gbps * 1e6)

``size_bytes`` are real bytes, ``available_gbps`` real Gbit/s (so
``bits / (Gbit/s * 1e6)`` is milliseconds) and ``tier`` is
``topology.tier_distance(src, dst)`` (0 same server, 1 same rack, 2 same pod,
3 across the core; -1 the same GPU).

* :class:`StaticOracle` uses the nominal bottleneck rate of the installed path
  (``topology.bottleneck_gbps``): no telemetry.
* :class:`TelemetryOracle` uses ``min over the path's directed hops of
  max(capacity - measured load, MIN_AVAILABLE_FRACTION * capacity)``.  The
  floor keeps estimates finite on saturated links (a saturated link still
  drains at some rate: TCP/RDMA flows share it).  If any hop of the path has no
  sample, or its sample is older than ``max_age_ms``, the answer is the static
  estimate with ``source="static-fallback"`` and a ``reason``.
* :class:`StaleOracle` is a :class:`TelemetryOracle` that sees every hop as it
  was ``delay_ms`` earlier (a :class:`DelayedSource` keeps the history), to
  study routing on stale telemetry.
* :class:`TensorParallelOracle` prices a transfer between two tensor-parallel
  instances (``tp`` GPU hosts each): ``tp`` concurrent flows, rank i to rank i,
  each of its rank's share of the bytes, each on its own installed path, where
  a hop crossed by k of these flows gives each 1/k of its bandwidth; the
  transfer ends with its slowest flow, so its cost is the maximum.

Per-tier base latency (:data:`BASE_LATENCY_MS_BY_TIER`) is the fixed cost of a
transfer before bandwidth matters: RDMA/NVLink work-request setup and
completion (about 1-2 us at the endpoints) plus the port-to-port latency of each
switch crossed (about 0.5-1 us for a cut-through datacenter switch; tier 1
crosses one ToR, tier 2 three switches, tier 3 five) plus fibre propagation
(about 5 ns per metre).  These are modelled figures, not measurements of this
testbed; pass ``base_latency_ms_by_tier`` to override them.

Hot path: each oracle precomputes, per (src, dst) pair and on first use, the
pair's tier, directed hops, nominal bottleneck and base latency, and per
telemetry snapshot it computes each pair's available bandwidth once.
:meth:`transfer_model` returns ``(tier, base_latency_ms, ms_per_byte)`` so a
scheduler can price many payloads on one pair with one multiply-add; it is the
same arithmetic :meth:`estimate` uses.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from topologies.model import Hop, Link, Topology, pick_path

from .telemetry import LinkSample, TelemetrySnapshot, TelemetrySource

# tier distance -> fixed latency (ms) of one transfer; see the module docstring.
BASE_LATENCY_MS_BY_TIER: Mapping[int, float] = {
    -1: 0.0,  # same GPU: nothing crosses a link
    0: 0.002,  # same server: NVLink/PCIe peer copy setup + completion (~2 us)
    1: 0.004,  # same rack: NIC send/receive (~2 us) + PCIe + one ToR (~1 us) + cable
    2: 0.006,  # same pod: + ToR -> aggregation -> ToR (two more switch hops)
    3: 0.008,  # across the core: + aggregation -> core -> aggregation
}
# Available bandwidth on a hop never drops below this fraction of capacity.
MIN_AVAILABLE_FRACTION = 0.01
# Default maximum telemetry age: the controller polls every 0.5 s, so a live
# sample is at most ~0.5 s plus polling latency old; 2 s is four polls.
DEFAULT_MAX_AGE_MS = 2000.0

SOURCES = ("telemetry", "static", "static-fallback")
# A link that is down carries nothing: its capacity is priced at this (real
# Gbit/s), so a path that still crosses it (no equal-cost path avoids it) costs
# about 8e3 ms per KB, orders of magnitude above any live path, while every
# figure stays finite (a zero-byte transfer costs 0, never NaN).
DOWN_LINK_GBPS = 1e-9


@dataclass(frozen=True)
class Estimate:
    transfer_ms: float
    available_gbps: float
    base_latency_ms: float
    tier: int
    hops: int
    telemetry_age_ms: float | None
    source: str  # "telemetry" | "static" | "static-fallback"
    reason: str = ""


@runtime_checkable
class Oracle(Protocol):
    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate: ...


@runtime_checkable
class LinearOracle(Oracle, Protocol):
    """An oracle whose transfer time is ``base_latency_ms + size_bytes * ms_per_byte``
    and which can say so (the fast path schedulers use)."""

    def transfer_model(self, src: str, dst: str, now_s: float) -> tuple[int, float, float]: ...

    def transfer_table(self, src: str, now_s: float) -> "TransferTable": ...

    def tier(self, src: str, dst: str) -> int: ...


def ms_per_byte(available_gbps: float) -> float:
    """Milliseconds one byte takes at ``available_gbps`` real Gbit/s."""
    return 8.0 / (available_gbps * 1e6)


def _check_latencies(base_latency_ms_by_tier: Mapping[int, float] | None) -> dict[int, float]:
    table = dict(BASE_LATENCY_MS_BY_TIER if base_latency_ms_by_tier is None else base_latency_ms_by_tier)
    for tier in (-1, 0, 1, 2, 3):
        if tier not in table:
            raise ValueError(f"base_latency_ms_by_tier lacks tier {tier}; needs tiers -1..3, got {sorted(table)}")
    for tier, value in table.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"base latency of tier {tier} must be finite and >= 0 ms, got {value}")
    return table


@dataclass(frozen=True)
class PairInfo:
    """Static facts about the installed path from one GPU to another."""

    tier: int
    hops: tuple[Hop, ...]
    bottleneck_gbps: float  # nominal; inf for the same GPU
    base_latency_ms: float
    static_ms_per_byte: float  # at the nominal bottleneck; 0 for the same GPU


class PathTable:
    """Lazily filled per-pair table of tier, hops, bottleneck and base latency."""

    def __init__(self, topology: Topology, base_latency_ms_by_tier: Mapping[int, float] | None = None) -> None:
        self.topology = topology
        self.base_latency_ms_by_tier = _check_latencies(base_latency_ms_by_tier)
        self._pairs: dict[tuple[str, str], PairInfo] = {}
        self._neighbors: dict[str, list[str]] | None = None
        self._dist: dict[str, dict[str, int]] = {}
        # Faults the oracle was told of (lab.faults): links out of service
        # (Link.key) and links re-rated (Link.key -> real Gbit/s).
        self.down: set[tuple[str, str]] = set()
        self.rates: dict[tuple[str, str], float] = {}

    def set_link(self, a: str, b: str, *, up: bool | None = None, rate_gbps: float | None = None) -> None:
        """A link went down or up, or was re-rated: routes and bottlenecks are
        computed again (the controller moves routes by the same rule,
        ``topologies.model.pick_path``)."""
        key = self.topology.link_between(a, b).key
        if up is not None:
            (self.down.discard if up else self.down.add)(key)
        if rate_gbps is not None:
            if not (math.isfinite(rate_gbps) and rate_gbps > 0):
                raise ValueError(f"rate_gbps must be finite and > 0, got {rate_gbps}")
            self.rates[key] = float(rate_gbps)
        self._pairs.clear()

    def rate_gbps(self, link: Link) -> float:
        """The link's capacity as the oracle prices it now (down: DOWN_LINK_GBPS)."""
        if link.key in self.down:
            return DOWN_LINK_GBPS
        return self.rates.get(link.key, link.rate_gbps)

    def capacity_overrides(self) -> dict[Hop, float]:
        """Directed hops whose capacity differs from the topology's, both directions."""
        out: dict[Hop, float] = {}
        for key in set(self.down) | set(self.rates):
            link = self.topology.link_between(*key)
            out[(link.a, link.b)] = out[(link.b, link.a)] = self.rate_gbps(link)
        return out

    def get(self, src: str, dst: str) -> PairInfo:
        key = (src, dst)
        info = self._pairs.get(key)
        if info is None:
            info = self._pairs[key] = self._compute(src, dst)
        return info

    def _compute(self, src: str, dst: str) -> PairInfo:
        topo = self.topology
        for name in (src, dst):
            if not topo.node(name).is_gpu:
                raise ValueError(f"{name} is a switch; transfers go between GPU hosts")
        if src == dst:
            return PairInfo(-1, (), math.inf, self.base_latency_ms_by_tier[-1], 0.0)
        nodes = self.route(src, dst)
        hops = tuple(zip(nodes, nodes[1:]))
        links = [topo.link_between(x, y) for x, y in hops]
        tier = max(l.tier for l in links)
        bottleneck = min(self.rate_gbps(l) for l in links)
        return PairInfo(tier, hops, bottleneck, self.base_latency_ms_by_tier[tier], ms_per_byte(bottleneck))

    # The installed route of every pair, computed like ``Topology.path`` (same
    # shortest paths, same sorted order, same CRC32 pick) but from one BFS per
    # source instead of one per pair, so a 4096-GPU table builds in seconds.
    # tests/unit/test_oracle.py checks it equals ``Topology.path`` pair by pair.
    def _dist_from(self, src: str) -> dict[str, int]:
        dist = self._dist.get(src)
        if dist is not None:
            return dist
        if self._neighbors is None:
            nb: dict[str, list[str]] = {name: [] for name in self.topology.nodes}
            for link in self.topology.links:
                nb[link.a].append(link.b)
                nb[link.b].append(link.a)
            self._neighbors = nb
        nodes = self.topology.nodes
        dist = {src: 0}
        order = deque([src])
        while order:
            cur = order.popleft()
            if cur != src and nodes[cur].is_gpu:
                continue  # GPU hosts never forward
            for nxt in self._neighbors[cur]:
                if nxt not in dist:
                    dist[nxt] = dist[cur] + 1
                    order.append(nxt)
        self._dist[src] = dist
        return dist

    def route(self, src: str, dst: str) -> list[str]:
        dist = self._dist_from(src)
        if dst not in dist:
            raise ValueError(f"no path from {src} to {dst}")
        nodes = self.topology.nodes
        assert self._neighbors is not None
        neighbors = self._neighbors
        paths: list[list[str]] = []

        def back(suffix: list[str]) -> None:
            cur = suffix[-1]
            if cur == src:
                paths.append(suffix[::-1])
                return
            want = dist[cur] - 1
            for prev in neighbors[cur]:
                if dist.get(prev) == want and (prev == src or not nodes[prev].is_gpu):
                    suffix.append(prev)
                    back(suffix)
                    suffix.pop()

        back([dst])
        paths.sort()
        return pick_path(paths, src, dst, self.down)

    def warm(self, src: str, dsts: list[str]) -> None:
        for dst in dsts:
            self.get(src, dst)


_TABLE_EPOCHS = itertools.count(1)
TransferModel = tuple[int, float, float]  # (tier, base_latency_ms, ms_per_byte)


class TransferTable(dict[str, TransferModel]):
    """``dst -> (tier, base_latency_ms, ms_per_byte)`` for one source, valid
    while the oracle's telemetry and its freshness do not change; entries are
    computed on first lookup.  ``epoch`` is unique per table, so callers may
    cache anything derived from a table under it."""

    def __init__(self, fill: Callable[[str], TransferModel], created_s: float) -> None:
        super().__init__()
        self._fill = fill
        self.epoch = next(_TABLE_EPOCHS)
        self.created_s = created_s
        self.now_s = created_s
        self.valid_until_s = math.inf

    def __missing__(self, dst: str) -> TransferModel:
        value = self._fill(dst)
        self[dst] = value
        return value


class StaticOracle:
    """Tier latency + nominal bottleneck rate of the installed path; no telemetry."""

    def __init__(self, topology: Topology, base_latency_ms_by_tier: Mapping[int, float] | None = None) -> None:
        self.paths = PathTable(topology, base_latency_ms_by_tier)
        self._tables: dict[str, TransferTable] = {}

    def set_link(self, a: str, b: str, *, up: bool | None = None, rate_gbps: float | None = None) -> None:
        """A link fault (see :meth:`PathTable.set_link`): a down link is priced
        unavailable (DOWN_LINK_GBPS), a re-rated one at its new rate."""
        self.paths.set_link(a, b, up=up, rate_gbps=rate_gbps)
        self._tables = {}

    def tier(self, src: str, dst: str) -> int:
        return self.paths.get(src, dst).tier

    def transfer_model(self, src: str, dst: str, now_s: float) -> tuple[int, float, float]:
        info = self.paths.get(src, dst)
        return info.tier, info.base_latency_ms, info.static_ms_per_byte

    def transfer_table(self, src: str, now_s: float) -> TransferTable:
        table = self._tables.get(src)
        if table is None:
            table = self._tables[src] = TransferTable(lambda dst: self.transfer_model(src, dst, 0.0), now_s)
        return table

    def warm(self, sources: Iterable[str]) -> None:
        """Compute the installed paths from each of ``sources`` to every GPU
        now (a router's start-up work), not on the first decision from each."""
        gpus = self.paths.topology.gpu_names()
        for src in sources:
            self.paths.warm(src, gpus)

    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate:
        _check_size(size_bytes)
        info = self.paths.get(src, dst)
        return Estimate(
            transfer_ms=info.base_latency_ms + size_bytes * info.static_ms_per_byte,
            available_gbps=info.bottleneck_gbps, base_latency_ms=info.base_latency_ms,
            tier=info.tier, hops=len(info.hops), telemetry_age_ms=None, source="static",
            reason="same GPU: no link crossed" if not info.hops else "",
        )


def _check_size(size_bytes: int) -> None:
    if size_bytes < 0:
        raise ValueError(f"size_bytes must be >= 0, got {size_bytes}")


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
    ) -> None:
        if max_age_ms is not None and not (max_age_ms > 0):
            raise ValueError(f"max_age_ms must be > 0 or None, got {max_age_ms}")
        if not 0 < min_available_fraction <= 1:
            raise ValueError(f"min_available_fraction must be in (0, 1], got {min_available_fraction}")
        if not (refresh_ms >= 0):
            raise ValueError(f"refresh_ms must be >= 0, got {refresh_ms}")
        self.paths = PathTable(topology, base_latency_ms_by_tier)
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
            dsts = self.paths.topology.gpu_names()
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

    def warm(self, sources: Iterable[str]) -> None:
        """Compute the installed paths from each of ``sources`` to every GPU
        and their hop matrix now (a router's start-up work), not on the first
        decision from each source, and have :meth:`prepare` build their
        transfer tables with every snapshot from now on.  Without the second
        part the first decision from each source built its own table: in the
        one-minute replays of the long-context experiment that was 15-18 of
        about 210 decisions, at a median 290-480 us each: the decision time's tail."""
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
        _check_size(size_bytes)
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
    ) -> None:
        self.delayed = DelayedSource(source, delay_ms)
        super().__init__(
            topology, self.delayed, max_age_ms, base_latency_ms_by_tier,
            min_available_fraction=min_available_fraction,
        )

    def _read_source(self, now_s: float) -> TelemetrySnapshot:
        return self.delayed.at(now_s)


# A rank flow whose path shares hops with other ranks' flows: (its hops with
# the number of rank flows on each, its nominal share: min of rate / count).
_RankShare = tuple[tuple[tuple[Hop, int], ...], float]
# An instance pair: its rank pairs, and each rank's sharing (None: no hop shared).
_RankLayout = tuple[list[tuple[str, str]], list[_RankShare | None]]


class TensorParallelOracle:
    """Transfers between tensor-parallel instances, priced rank pair by rank pair.

    An instance is named by its rank-0 GPU host; ``ranks`` gives every
    instance's GPU hosts in rank order (``tp`` each).  A transfer of
    ``size_bytes`` from instance P to instance D is ``tp`` concurrent flows,
    rank i of P to rank i of D, of ``b_i = split(size_bytes)[i]`` bytes each
    (the perf model's ``rank_flow_bytes``), and it ends when the last flow
    lands::

        transfer_ms(P, D, size) = max over i of cost_i
        cost_i = base_latency_ms(P_i, D_i) + b_i * 8 / (min over hops h of (P_i -> D_i) of avail_h / k_h * 1e6)

    where ``avail_h`` is the hop's bandwidth as the inner oracle sees it for
    that pair (nominal for a static answer, ``max(capacity - load, floor)``
    for a telemetry one) and ``k_h`` the number of this transfer's rank flows
    whose installed path crosses ``h``.  Where no hop is shared (``k_h = 1``,
    e.g. two instances of one server: every rank has its own GPU links) this
    is exactly ``max over i of inner.estimate(P_i, D_i, b_i).transfer_ms``; where
    the ranks share a hop (the server uplink of the default fabric, one for
    all GPUs of a server) they share its bandwidth, as TCP flows do, so a
    transfer between servers is not priced as if it had ``tp`` uplinks.
    Concurrent transfers of other requests are not charged, as for a single flow.

    The answer is the slowest rank's :class:`Estimate` (its bandwidth, hops and
    tier), except that ``telemetry_age_ms`` is the oldest of all ranks' and a
    fallback to static on any rank makes the whole answer ``static-fallback``
    (with that rank's reason).  The hop sharing needs the inner oracle's
    installed paths (``paths``, as :class:`StaticOracle` and
    :class:`TelemetryOracle` have); without them each rank is priced alone.

    It offers no ``transfer_table`` (a maximum of linear costs is not linear),
    so schedulers take their per-candidate ``estimate`` path: ``tp`` inner
    estimates per candidate."""

    def __init__(self, inner: Oracle, ranks: Mapping[str, Sequence[str]],
                 split: Callable[[int], Sequence[int]]) -> None:
        sizes = {len(hosts) for hosts in ranks.values()}
        if len(sizes) != 1 or min(sizes) < 1:
            raise ValueError(f"every instance needs the same number (>= 1) of rank hosts, got {sorted(sizes)}")
        self.inner = inner
        self.ranks = {name: tuple(hosts) for name, hosts in ranks.items()}
        self.tp = sizes.pop()
        self.split = split
        self._layouts: dict[tuple[str, str], _RankLayout] = {}
        self._shared_snapshot: object = None  # the inner snapshot _shared_gbps was computed on
        self._shared_gbps: dict[tuple[str, str], float] = {}

    def ranks_of(self, instance: str) -> tuple[str, ...]:
        hosts = self.ranks.get(instance)
        if hosts is None:
            raise ValueError(f"{instance} is not a tensor-parallel instance this oracle knows")
        return hosts

    # Per (src, dst) instance pair, computed once: the rank pairs and, for each
    # rank whose path shares a hop with another rank's, its hops with the
    # number of rank flows on each and its nominal share (min of rate / k).
    def _layout(self, src: str, dst: str) -> _RankLayout:
        key = (src, dst)
        lay = self._layouts.get(key)
        if lay is None:
            pairs = list(zip(self.ranks_of(src), self.ranks_of(dst)))
            paths: PathTable | None = getattr(self.inner, "paths", None)
            shares: list[_RankShare | None] = [None] * len(pairs)
            if paths is not None:
                hops = [paths.get(s, d).hops for s, d in pairs]
                flows_on: dict[Hop, int] = {}
                for path in hops:
                    for hop in path:
                        flows_on[hop] = flows_on.get(hop, 0) + 1
                link = paths.topology.link_between
                for i, path in enumerate(hops):
                    if any(flows_on[h] > 1 for h in path):
                        on = tuple((h, flows_on[h]) for h in path)
                        shares[i] = (on, min(link(*h).rate_gbps / k for h, k in on))
            lay = self._layouts[key] = (pairs, shares)
        return lay

    def _ranks(self, src: str, dst: str, size_bytes: int, now_s: float) -> list[tuple[Estimate, float, float]]:
        """Per rank flow: the inner estimate of it alone, and its transfer time
        and available bandwidth once shared hops are shared."""
        _check_size(size_bytes)
        sizes = list(self.split(size_bytes))
        if len(sizes) != self.tp or sum(sizes) != size_bytes:
            raise ValueError(f"split({size_bytes}) gave {sizes}: needs {self.tp} flows adding up to the size")
        pairs, shares = self._layout(src, dst)
        estimate = self.inner.estimate
        out: list[tuple[Estimate, float, float]] = []
        for (s, d), b, share in zip(pairs, sizes, shares):
            est = estimate(s, d, b, now_s)
            if share is None:
                out.append((est, est.transfer_ms, est.available_gbps))
                continue
            on, available = share  # nominal: what a static (or fallen back) estimate used
            if est.source == "telemetry":  # every hop of the pair has a sample, as the estimate used
                available = self._shared_telemetry_gbps(s, d, on, now_s)
            out.append((est, est.base_latency_ms + b * ms_per_byte(available), available))
        return out

    def _shared_telemetry_gbps(self, s: str, d: str, on: tuple[tuple[Hop, int], ...], now_s: float) -> float:
        """min over the rank pair's hops of (telemetry bandwidth / rank flows on
        it), kept while the inner oracle's snapshot object stays the same."""
        snap = self.inner.snapshot(now_s)  # type: ignore[attr-defined]
        if snap is not self._shared_snapshot:
            self._shared_snapshot = snap
            self._shared_gbps = {}
        gbps = self._shared_gbps.get((s, d))
        if gbps is None:
            hop_gbps = self.inner.hop_available_gbps  # type: ignore[attr-defined]
            gbps = self._shared_gbps[(s, d)] = min(hop_gbps(h, now_s) / k for h, k in on)
        return gbps

    def rank_estimates(self, src: str, dst: str, size_bytes: int, now_s: float) -> list[Estimate]:
        """The estimate of each rank flow, rank 0 first (shared hops shared)."""
        return [est if est.transfer_ms == ms and est.available_gbps == gbps
                else replace(est, transfer_ms=ms, available_gbps=gbps)
                for est, ms, gbps in self._ranks(src, dst, size_bytes, now_s)]

    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate:
        per_rank = self._ranks(src, dst, size_bytes, now_s)
        worst = per_rank[0]
        for r in per_rank[1:]:
            if r[1] > worst[1]:
                worst = r
        est, transfer_ms, available = worst
        ages = [r[0].telemetry_age_ms for r in per_rank]
        age = None if any(a is None for a in ages) else max(a for a in ages if a is not None)
        source, reason = est.source, est.reason
        for rank, r in enumerate(per_rank):
            if r[0].source == "static-fallback":
                source, reason = "static-fallback", f"rank {rank}: {r[0].reason}"
                break
        return Estimate(transfer_ms=transfer_ms, available_gbps=available, base_latency_ms=est.base_latency_ms,
                        tier=est.tier, hops=est.hops, telemetry_age_ms=age, source=source, reason=reason)

    def tier(self, src: str, dst: str) -> int:
        """Highest tier distance over the rank pairs (they are all equal when
        each instance lies within one server)."""
        tier_of = getattr(self.inner, "tier", None)
        pairs = zip(self.ranks_of(src), self.ranks_of(dst))
        if tier_of is not None:
            return max(int(tier_of(s, d)) for s, d in pairs)
        return max(self.inner.estimate(s, d, 0, 0.0).tier for s, d in pairs)

    def warm(self, sources: Iterable[str]) -> None:
        """The inner oracle's start-up work for every rank host of ``sources``."""
        warm = getattr(self.inner, "warm", None)
        if warm is not None:
            warm([h for src in sources for h in self.ranks_of(src)])
