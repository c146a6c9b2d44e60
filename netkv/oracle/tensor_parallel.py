"""Transfers between tensor-parallel instances, priced rank pair by rank pair."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

from topologies.model import Hop

from .base import Estimate, Oracle, check_size, ms_per_byte
from .paths import PathTable
from .telemetry import TelemetryOracle

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
        check_size(size_bytes)
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
        inner = self.inner
        assert isinstance(inner, TelemetryOracle), "a telemetry estimate comes from a telemetry oracle"
        snap = inner.snapshot(now_s)
        if snap is not self._shared_snapshot:
            self._shared_snapshot = snap
            self._shared_gbps = {}
        gbps = self._shared_gbps.get((s, d))
        if gbps is None:
            per_flow = []
            for hop, flows in on:
                hop_gbps = inner.hop_available_gbps(hop, now_s)
                if hop_gbps is None:  # a telemetry estimate had a sample on every hop of its path
                    raise RuntimeError(f"hop {hop} of {s}->{d} has no sample under a telemetry estimate")
                per_flow.append(hop_gbps / flows)
            gbps = self._shared_gbps[(s, d)] = min(per_flow)
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

    def warm(self, sources: Iterable[str], destinations: Iterable[str] | None = None) -> None:
        """The inner oracle's start-up work for every rank host of ``sources``
        (towards every rank host of ``destinations``, when given)."""
        warm = getattr(self.inner, "warm", None)
        if warm is not None:
            warm([h for src in sources for h in self.ranks_of(src)],
                 None if destinations is None else [h for dst in destinations for h in self.ranks_of(dst)])
