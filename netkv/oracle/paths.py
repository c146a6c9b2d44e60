"""The installed path of every GPU pair, as an oracle prices it: tier, hops,
nominal bottleneck and base latency, computed once per pair; and the
per-source transfer tables schedulers read on their hot path."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from topologies.model import Hop, Link, Topology

from .base import DOWN_LINK_GBPS, check_latencies, ms_per_byte


@dataclass(frozen=True, slots=True)  # slots: a 4,096-GPU fabric's oracle holds 4.2 M of them
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
        self.base_latency_ms_by_tier = check_latencies(base_latency_ms_by_tier)
        self._pairs: dict[tuple[str, str], PairInfo] = {}
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
        hops = tuple(topo.path_hops(src, dst, self.down))  # the topology's hop tuples, shared by every pair
        links = [topo.link_between(x, y) for x, y in hops]
        tier = max(l.tier for l in links)
        bottleneck = min(self.rate_gbps(l) for l in links)
        return PairInfo(tier, hops, bottleneck, self.base_latency_ms_by_tier[tier], ms_per_byte(bottleneck))

    def route(self, src: str, dst: str) -> list[str]:
        """The installed route: the controller's rule (``topologies.model.pick_path``
        over the topology's shortest paths), avoiding links that are down."""
        return self.topology.path(src, dst, self.down)

    def warm(self, src: str, dsts: list[str]) -> None:
        for dst in dsts:
            self.get(src, dst)

    def tier(self, src: str, dst: str) -> int:
        return self.get(src, dst).tier


def shared_paths(topology: Topology, paths: "PathTable | None",
                 base_latency_ms_by_tier: Mapping[int, float] | None) -> PathTable:
    """An oracle's path table: ``paths`` when given (a table computed before,
    shared by the oracles of many replays: it must be of the same topology and
    base latencies, and no fault told to it yet), else a new one."""
    if paths is None:
        return PathTable(topology, base_latency_ms_by_tier)
    if paths.topology is not topology:
        raise ValueError("a shared path table must be of the oracle's own topology")
    if paths.base_latency_ms_by_tier != check_latencies(base_latency_ms_by_tier):
        raise ValueError("a shared path table must have the oracle's base latencies")
    if paths.down or paths.rates:
        raise ValueError("a shared path table must have no link faults told to it")
    return paths


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
