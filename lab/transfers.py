"""Measured KV transfers against their ideal time on the emulated fabric.

One place for the arithmetic that the replay integration test and
``bench/workers.py`` share:

* the *ideal* time of a transfer is its emulated payload (``bytes_sent``) at the
  emulated bottleneck rate of the installed path (real rate / scale);
* htb lets an idle link send its bucket, and one frame more, at once
  (:func:`shaping.htb_burst_bytes`, :func:`bucket_ms`),
  so a transfer on an idle path may beat the ideal by at most that much;
* a transfer is on an *idle path* when no other transfer of the run, and no
  background flow of the run's scenario (:class:`Background`), crossed a
  directed hop of its path while it ran, in either direction: a transfer's
  path is its data's hops and its acknowledgements' hops (the installed path
  back, which ECMP may put on other links), since TCP is slowed by queues on
  its ACK path as much as on its data path (:func:`tcp_hops`).

Records are the dicts of :mod:`netkv.records` (``prefill``, ``decode``,
``bytes_sent``, ``transfer_start_ms``, ``transfer_end_ms``, ``status``).

Tensor parallelism (``ranks``: each instance's GPU hosts by its rank-0 name,
the ``ranks`` of a run's placement in ``run.json``): a transfer is ``tp``
flows of ``bytes_sent / tp`` each, rank i to rank i; its path is every rank
pair's, and its ideal time is a flow's bytes at the smallest share any hop
gives (a hop crossed by k of the flows gives each 1/k of its rate), the
arithmetic of :class:`netkv.oracle.TensorParallelOracle` at nominal rates.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from fabric import shaping
from topologies import Topology

IDLE_MIN_IDEAL_MS = 5.0  # below this, per-packet latency of the emulator dominates the ratio
# Background flows start just before the replay's clock starts and stop just
# after it ends; their windows are widened by this much on each side.
BACKGROUND_SLACK_MS = 1000.0


@dataclass(frozen=True)
class Background:
    """A scenario flow as the idle-path rule sees it: the directed hops it
    loads and when, in ms of the replay's clock."""

    hops: frozenset[tuple[str, str]]  # its data's and its ACKs'
    start_ms: float
    end_ms: float
    data_hops: frozenset[tuple[str, str]] = frozenset()  # its data's only: what it loads

    def during(self, start_ms: float, end_ms: float) -> bool:
        return start_ms < self.end_ms + BACKGROUND_SLACK_MS and end_ms > self.start_ms - BACKGROUND_SLACK_MS

    def overlaps(self, hops: frozenset[tuple[str, str]], start_ms: float, end_ms: float) -> bool:
        return bool(self.hops & hops) and self.during(start_ms, end_ms)


def background_of(topo: Topology, flows: Iterable[Mapping[str, Any]]) -> list[Background]:
    """Background windows of scenario flows (dicts with src, dst, start_s, duration_s)."""
    return [Background(tcp_hops(topo, str(f["src"]), str(f["dst"])), 1000.0 * float(f["start_s"]),
                       1000.0 * (float(f["start_s"]) + float(f["duration_s"])),
                       frozenset(topo.path_hops(str(f["src"]), str(f["dst"])))) for f in flows]


Ranks = Mapping[str, Sequence[str]]  # TP instance (its rank-0 host) -> its GPU hosts, rank 0 first


def rank_pairs(rec: Mapping[str, Any], ranks: Ranks | None = None) -> list[tuple[str, str]]:
    """The (source, destination) GPU hosts of a transfer's flows: the record's
    pair, or with tensor parallelism rank i of each instance to rank i."""
    if not ranks:
        return [(rec["prefill"], rec["decode"])]
    return list(zip(ranks[rec["prefill"]], ranks[rec["decode"]]))


def ideal_ms(topo: Topology, scale: float, rec: Mapping[str, Any], ranks: Ranks | None = None) -> float:
    """Payload at the path's emulated bottleneck rate, in ms (tensor
    parallelism: one rank flow at the smallest share of a hop's rate)."""
    pairs = rank_pairs(rec, ranks)
    if len(pairs) == 1:
        bps = topo.bottleneck_gbps(*pairs[0]) * 1e9 / scale
        return float(rec["bytes_sent"]) * 8 / bps * 1e3
    crossing: dict[tuple[str, str], int] = {}
    for src, dst in pairs:
        for hop in topo.path_hops(src, dst):
            crossing[hop] = crossing.get(hop, 0) + 1
    share_bps = min(topo.link_between(*hop).rate_gbps / k for hop, k in crossing.items()) * 1e9 / scale
    return math.ceil(int(rec["bytes_sent"]) / len(pairs)) * 8 / share_bps * 1e3


def bucket_ms(topo: Topology, scale: float, mtu_bytes: int, rec: Mapping[str, Any],
              ranks: Ranks | None = None) -> float:
    """What htb lets the path's bottleneck send at once after an idle period,
    in ms of its rate: an idle path can beat the ideal by at most this much.

    That is the bucket plus one full frame: htb lets a class send while its
    tokens are not negative and charges the whole frame afterwards, so the
    last frame of a burst may overdraw the bucket.  (A 14 kB transfer at
    5 Mbit/s on the per-switch emulator took 12.78 ms against an ideal of
    22.66 ms less a 4-frame bucket of 9.69 ms.)"""
    out = 0.0
    for src, dst in rank_pairs(rec, ranks):  # tensor parallelism: the largest over the rank pairs
        mbps = topo.bottleneck_gbps(src, dst) * 1000 / scale
        burst_bytes = shaping.htb_burst_bytes(mbps, mtu_bytes) + mtu_bytes + 14
        out = max(out, burst_bytes * 8 / (mbps * 1e6) * 1e3)
    return out


def tcp_hops(topo: Topology, src: str, dst: str) -> frozenset[tuple[str, str]]:
    """Directed hops a TCP connection from src to dst uses: its data's and its ACKs'."""
    return frozenset(topo.path_hops(src, dst)) | frozenset(topo.path_hops(dst, src))


@dataclass(frozen=True)
class IdleTransfer:
    request_id: str
    tier_distance: int
    measured_ms: float
    ideal_ms: float
    bucket_ms: float

    @property
    def ratio(self) -> float:
        """Measured over ideal transfer time."""
        return self.measured_ms / self.ideal_ms

    def within(self, max_ratio: float) -> bool:
        """At most ``max_ratio`` times the ideal and not faster than the
        ideal less the htb bucket."""
        return self.ideal_ms - self.bucket_ms <= self.measured_ms <= max_ratio * self.ideal_ms


def _has_transfer(rec: Mapping[str, Any]) -> bool:
    return rec.get("transfer_start_ms") is not None and rec.get("transfer_end_ms") is not None \
        and bool(rec.get("prefill")) and bool(rec.get("decode"))


def idle_transfers(topo: Topology, scale: float, mtu_bytes: int, records: Sequence[Mapping[str, Any]],
                   *, min_ideal_ms: float = IDLE_MIN_IDEAL_MS,
                   background: Sequence[Background] = (), ranks: Ranks | None = None) -> list[IdleTransfer]:
    """The ok transfers whose path no other transfer and no background flow
    used while they ran and whose ideal time is at least ``min_ideal_ms``.
    Any record with transfer stamps (failed ones too) counts as a possible
    competitor."""
    moved = [r for r in records if _has_transfer(r)]
    hops: dict[tuple[str, str], frozenset[tuple[str, str]]] = {}

    def hops_of(r: Mapping[str, Any]) -> frozenset[tuple[str, str]]:
        key = (str(r["prefill"]), str(r["decode"]))
        if key not in hops:
            hops[key] = frozenset().union(*(tcp_hops(topo, *pair) for pair in rank_pairs(r, ranks)))
        return hops[key]

    by_start = sorted(moved, key=lambda r: float(r["transfer_start_ms"]))
    starts = [float(r["transfer_start_ms"]) for r in by_start]
    # a transfer overlapping another began at most the longest transfer's length before it
    longest_ms = max((float(r["transfer_end_ms"]) - float(r["transfer_start_ms"]) for r in by_start), default=0.0)
    out: list[IdleTransfer] = []
    for i, r in enumerate(by_start):
        if r.get("status") != "ok":
            continue
        ideal = ideal_ms(topo, scale, r, ranks)
        if ideal < min_ideal_ms:
            continue
        start, end = float(r["transfer_start_ms"]), float(r["transfer_end_ms"])
        mine = hops_of(r)
        busy = any(b.overlaps(mine, start, end) for b in background)
        first = bisect.bisect_left(starts, start - longest_ms)
        for j in range(first, len(by_start)):
            o = by_start[j]
            if busy or float(o["transfer_start_ms"]) >= end:
                break  # sorted by start: no later one can overlap
            if j == i or float(o["transfer_end_ms"]) <= start:
                continue
            if mine & hops_of(o):
                busy = True
                break
        if not busy:
            out.append(IdleTransfer(str(r["request_id"]), int(r.get("tier_distance") or 0), end - start, ideal,
                                    bucket_ms(topo, scale, mtu_bytes, r, ranks)))
    return out


def ratios(transfers: Iterable[IdleTransfer]) -> list[float]:
    return [t.ratio for t in transfers]


@dataclass(frozen=True)
class Priced:
    """One transfer the oracle priced at decision time, as it went."""

    tier_distance: int
    loaded: bool  # a background flow shared its path while it ran
    estimate_ms: float
    measured_ms: float

    @property
    def ratio(self) -> float:
        """Measured over estimated transfer time."""
        return self.measured_ms / self.estimate_ms


def priced_transfers(topo: Topology, records: Sequence[Mapping[str, Any]], *,
                     background: Sequence[Background] = (), ranks: Ranks | None = None) -> list[Priced]:
    """Every ok transfer that crossed a link and whose decision carried the
    oracle's estimate (``estimate_transfer_ms``), with its measured time;
    ``loaded`` when a background flow's data went the same way over one of
    its data's links while it ran (sharing only with the flow's ACKs does not
    count: they load nothing)."""
    out = []
    for r in records:
        est = r.get("estimate_transfer_ms")
        if r.get("status") != "ok" or est is None or float(est) <= 0 or not _has_transfer(r) \
                or r["prefill"] == r["decode"] or not int(r.get("bytes_sent") or 0):
            continue
        start, end = float(r["transfer_start_ms"]), float(r["transfer_end_ms"])
        hops = frozenset().union(*(frozenset(topo.path_hops(*pair)) for pair in rank_pairs(r, ranks)))
        loaded = any(bool(b.data_hops & hops) and b.during(start, end) for b in background)
        out.append(Priced(int(r.get("tier_distance") or 0), loaded, float(est), end - start))
    return out
