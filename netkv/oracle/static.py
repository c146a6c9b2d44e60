"""The static oracle: tier latency and the nominal bottleneck rate of the
installed path; no telemetry."""

from __future__ import annotations

from typing import Iterable, Mapping

from topologies.model import Topology

from .base import Estimate, check_size
from .paths import PathTable, TransferTable, shared_paths


class StaticOracle:
    """Tier latency + nominal bottleneck rate of the installed path; no telemetry."""

    def __init__(self, topology: Topology, base_latency_ms_by_tier: Mapping[int, float] | None = None, *,
                 paths: PathTable | None = None) -> None:
        """``paths``: a path table computed before (:func:`~netkv.oracle.paths.shared_paths`)."""
        self.paths = shared_paths(topology, paths, base_latency_ms_by_tier)
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

    def warm(self, sources: Iterable[str], destinations: Iterable[str] | None = None) -> None:
        """Compute the installed paths from each of ``sources`` to every GPU
        (or to ``destinations``) now (a router's start-up work), not on the
        first decision from each."""
        dsts = self.paths.topology.gpu_names() if destinations is None else list(destinations)
        for src in sources:
            self.paths.warm(src, dsts)

    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate:
        check_size(size_bytes)
        info = self.paths.get(src, dst)
        return Estimate(
            transfer_ms=info.base_latency_ms + size_bytes * info.static_ms_per_byte,
            available_gbps=info.bottleneck_gbps, base_latency_ms=info.base_latency_ms,
            tier=info.tier, hops=len(info.hops), telemetry_age_ms=None, source="static",
            reason="same GPU: no link crossed" if not info.hops else "",
        )
