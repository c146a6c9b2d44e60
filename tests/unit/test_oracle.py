"""Oracle, telemetry snapshot and stale-telemetry tests (no root, no network)."""

from __future__ import annotations

import math

import pytest

import topologies
from netkv.oracle import (
    BASE_LATENCY_MS_BY_TIER,
    MIN_AVAILABLE_FRACTION,
    DelayedSource,
    PathTable,
    StaleOracle,
    StaticOracle,
    TelemetryOracle,
)
from netkv.telemetry import LinkSample, TelemetrySnapshot, constant_source
from topologies.model import Topology

NOW = 1_000.0


@pytest.fixture(scope="module")
def fattree() -> Topology:
    return topologies.build("fattree")


def idle_snapshot(topo: Topology, t_s: float, load_fraction: float = 0.0) -> TelemetrySnapshot:
    samples = {}
    for link in topo.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            load = load_fraction * link.rate_gbps
            samples[(x, y)] = LinkSample(x, y, t_s, load, link.rate_gbps, load_fraction)
    return TelemetrySnapshot(samples)


def with_load(snap: TelemetrySnapshot, hop: tuple[str, str], load_gbps: float, t_s: float | None = None) -> TelemetrySnapshot:
    out = dict(snap.samples)
    s = out[hop]
    out[hop] = LinkSample(s.src, s.dst, s.t_s if t_s is None else t_s, load_gbps, s.capacity_gbps,
                          load_gbps / s.capacity_gbps)
    return TelemetrySnapshot(out)


@pytest.mark.parametrize("name", ["tiny", "leafspine", "fattree"])
def test_path_table_routes_equal_topology_path(name: str) -> None:
    topo = topologies.build(name)
    table = PathTable(topo)
    gpus = topo.gpu_names()
    for a in gpus[::3] if name == "fattree" else gpus:
        for b in gpus:
            if a != b:
                assert table.route(a, b) == topo.path(a, b), (a, b)
                info = table.get(a, b)
                assert info.tier == topo.tier_distance(a, b)
                assert info.bottleneck_gbps == topo.bottleneck_gbps(a, b)


def test_static_estimate_per_tier(fattree: Topology) -> None:
    oracle = StaticOracle(fattree)
    size = 10**9
    # g1 same server, g8 same rack, g16 same pod, g32 other pod
    for dst, tier, gbps in (("g1", 0, 1600.0), ("g8", 1, 400.0), ("g16", 2, 400.0), ("g32", 3, 200.0)):
        est = oracle.estimate("g0", dst, size, NOW)
        assert (est.tier, est.available_gbps, est.source) == (tier, gbps, "static")
        assert est.transfer_ms == pytest.approx(BASE_LATENCY_MS_BY_TIER[tier] + size * 8 / (gbps * 1e6))
        assert est.telemetry_age_ms is None
        assert est.hops == len(fattree.path_hops("g0", dst))
    assert oracle.estimate("g0", "g32", 10**9, NOW).transfer_ms == pytest.approx(40.008)
    same = oracle.estimate("g3", "g3", 1234, NOW)
    assert (same.tier, same.transfer_ms, same.hops) == (-1, 0.0, 0)


def test_static_rejects_switch_and_negative_size(fattree: Topology) -> None:
    oracle = StaticOracle(fattree)
    with pytest.raises(ValueError, match="switch"):
        oracle.estimate("g0", "t0", 1, NOW)
    with pytest.raises(ValueError, match="size_bytes"):
        oracle.estimate("g0", "g1", -1, NOW)
    with pytest.raises(ValueError, match="tier 3"):
        StaticOracle(fattree, {-1: 0.0, 0: 0.0, 1: 0.0, 2: 0.0})


def test_telemetry_available_is_min_residual_over_hops(fattree: Topology) -> None:
    hops = fattree.path_hops("g0", "g32")
    core_hop = next(h for h in hops if h[0].startswith("a") and h[1].startswith("c"))
    snap = with_load(idle_snapshot(fattree, NOW - 0.1), core_hop, 150.0)  # 200 G link, 50 G left
    oracle = TelemetryOracle(fattree, constant_source(snap))
    est = oracle.estimate("g0", "g32", 10**9, NOW)
    assert est.source == "telemetry" and est.reason == ""
    assert est.available_gbps == pytest.approx(50.0)
    assert est.transfer_ms == pytest.approx(0.008 + 10**9 * 8 / (50.0 * 1e6))
    assert est.telemetry_age_ms == pytest.approx(100.0)
    # the reverse direction is a different set of directed hops: unaffected
    assert oracle.estimate("g32", "g0", 10**9, NOW).available_gbps == pytest.approx(200.0)


def test_saturated_hop_is_floored(fattree: Topology) -> None:
    hop = fattree.path_hops("g0", "g8")[1]  # v0 -> t0, 400 G
    snap = with_load(idle_snapshot(fattree, NOW), hop, 900.0)  # over capacity
    est = TelemetryOracle(fattree, constant_source(snap)).estimate("g0", "g8", 1000, NOW)
    assert est.available_gbps == pytest.approx(MIN_AVAILABLE_FRACTION * 400.0)
    assert math.isfinite(est.transfer_ms)


def test_missing_hop_falls_back_to_static(fattree: Topology) -> None:
    snap = idle_snapshot(fattree, NOW)
    hop = fattree.path_hops("g0", "g16")[2]
    del snap.samples[hop]
    oracle = TelemetryOracle(fattree, constant_source(snap))
    est = oracle.estimate("g0", "g16", 10**6, NOW)
    assert est.source == "static-fallback"
    assert f"{hop[0]}->{hop[1]}" in est.reason
    assert est.telemetry_age_ms is None
    static = StaticOracle(fattree).estimate("g0", "g16", 10**6, NOW)
    assert est.transfer_ms == static.transfer_ms
    assert oracle.transfer_model("g0", "g16", NOW) == StaticOracle(fattree).transfer_model("g0", "g16", NOW)


def test_old_sample_falls_back_and_reports_age(fattree: Topology) -> None:
    snap = with_load(idle_snapshot(fattree, NOW - 0.1, 0.5), fattree.path_hops("g0", "g8")[1], 100.0, t_s=NOW - 5.0)
    est = TelemetryOracle(fattree, constant_source(snap), max_age_ms=2000).estimate("g0", "g8", 1000, NOW)
    assert est.source == "static-fallback"
    assert "5000.0 ms old > max_age_ms 2000" in est.reason
    assert est.telemetry_age_ms == pytest.approx(5000.0)
    # with no age limit the old figures are used
    est = TelemetryOracle(fattree, constant_source(snap), max_age_ms=None).estimate("g0", "g8", 1000, NOW)
    assert est.source == "telemetry" and est.available_gbps == pytest.approx(200.0)


def test_transfer_table_matches_estimate_and_expires(fattree: Topology) -> None:
    snap = idle_snapshot(fattree, NOW, 0.25)
    oracle = TelemetryOracle(fattree, constant_source(snap), max_age_ms=1000)
    table = oracle.transfer_table("g0", NOW)
    for dst in ("g1", "g9", "g20", "g40"):
        tier, base, mpb = table[dst]
        est = oracle.estimate("g0", dst, 123_456_789, NOW)
        assert est.transfer_ms == base + 123_456_789 * mpb
        assert est.tier == tier
    assert oracle.transfer_table("g0", NOW + 0.5) is table  # still fresh: reused
    later = oracle.transfer_table("g0", NOW + 1.5)  # samples now 1.5 s old
    assert later is not table and later.epoch != table.epoch
    assert later["g40"] == StaticOracle(fattree).transfer_model("g0", "g40", NOW)


def test_source_read_once_per_time(fattree: Topology) -> None:
    calls = []
    snap = idle_snapshot(fattree, NOW)

    def source() -> TelemetrySnapshot:
        calls.append(1)
        return snap

    oracle = TelemetryOracle(fattree, source)
    for dst in ("g1", "g8", "g32"):
        oracle.estimate("g0", dst, 1, NOW)
    assert len(calls) == 1
    oracle.estimate("g0", "g8", 1, NOW + 0.01)
    assert len(calls) == 2


def test_snapshot_json_round_trip_and_controller_shape() -> None:
    s = LinkSample("t0", "a0", 12.5, 100.0, 400.0, 0.25, drops=3)
    snap = TelemetrySnapshot.of([s])
    again = TelemetrySnapshot.from_json(snap.to_json())
    assert again.samples == snap.samples
    row = {**s.to_json(), "tier": 2, "interval_s": 0.5, "rate_bps": 1e8, "packets": 10, "age_ms": 3.0}
    assert TelemetrySnapshot.from_json({"t_s": 13.0, "scale": 1000, "links": [row]}).get("t0", "a0") == s
    assert snap.oldest_t_s([("t0", "a0")]) == 12.5
    assert snap.oldest_t_s([("t0", "a0"), ("a0", "t0")]) is None
    with pytest.raises(ValueError, match="load_gbps"):
        TelemetrySnapshot.from_json([{"src": "t0", "dst": "a0", "t_s": 1.0, "capacity_gbps": 1.0, "utilization": 0}])
    with pytest.raises(ValueError, match="capacity_gbps"):
        LinkSample("a", "b", 1.0, 1.0, 0.0, 0.0)


def test_delayed_source_replays_history() -> None:
    hop = ("t0", "a0")
    snaps = {
        0.0: TelemetrySnapshot({hop: LinkSample("t0", "a0", 10.0, 10.0, 400.0, 0.025)}),
        1.0: TelemetrySnapshot({hop: LinkSample("t0", "a0", 11.0, 390.0, 400.0, 0.975)}),
    }
    current = [snaps[0.0]]
    clock = [10.0]
    delayed = DelayedSource(lambda: current[0], delay_ms=500, clock=lambda: clock[0])
    assert delayed().samples == {}  # nothing 500 ms old yet
    clock[0] = 10.6
    assert delayed().samples[hop].load_gbps == 10.0
    current[0] = snaps[1.0]
    clock[0] = 11.2  # the 11.0 sample is only 200 ms old: still see the 10.0 one
    assert delayed().samples[hop].load_gbps == 10.0
    clock[0] = 11.5
    assert delayed().samples[hop].load_gbps == 390.0
    with pytest.raises(ValueError, match="delay_ms"):
        DelayedSource(lambda: current[0], delay_ms=-1)


def test_stale_oracle_sees_old_congestion(fattree: Topology) -> None:
    hop = fattree.path_hops("g0", "g8")[1]
    idle = idle_snapshot(fattree, NOW)
    busy = with_load(idle_snapshot(fattree, NOW + 1.0), hop, 380.0)
    current = [idle]
    stale = StaleOracle(fattree, lambda: current[0], delay_ms=1500)
    fresh = TelemetryOracle(fattree, lambda: current[0])
    assert stale.estimate("g0", "g8", 10**6, NOW + 0.5).source == "static-fallback"  # no sample 1.5 s old
    assert stale.estimate("g0", "g8", 10**6, NOW + 1.6).available_gbps == pytest.approx(400.0)
    current[0] = busy
    t = NOW + 1.7
    assert fresh.estimate("g0", "g8", 10**6, t).available_gbps == pytest.approx(20.0)
    old = stale.estimate("g0", "g8", 10**6, t)
    assert old.available_gbps == pytest.approx(400.0)  # still the idle picture
    assert old.telemetry_age_ms == pytest.approx(1700.0)
    assert stale.estimate("g0", "g8", 10**6, NOW + 2.6).available_gbps == pytest.approx(20.0)
    # with an age limit below the delay, the stale oracle falls back instead
    strict = StaleOracle(fattree, lambda: current[0], delay_ms=1500, max_age_ms=1000)
    assert strict.estimate("g0", "g8", 10**6, NOW + 2.6).source == "static-fallback"


def test_a_shared_path_table_is_used_as_is_and_refused_when_it_does_not_match() -> None:
    """Replays of one placement share the oracle's paths (computed once, in the
    simulator's zygote); a table of another topology, other base latencies or
    with a fault told to it would price the wrong paths, so it is refused."""
    topo = topologies.build("tiny")
    gpus = topo.gpu_names()
    paths = PathTable(topo)
    paths.warm(gpus[0], gpus[1:])
    assert StaticOracle(topo, paths=paths).paths is paths
    assert TelemetryOracle(topo, lambda: TelemetrySnapshot(), paths=paths).paths is paths
    assert StaticOracle(topo, paths=paths).tier(gpus[0], gpus[-1]) == topo.tier_distance(gpus[0], gpus[-1])
    with pytest.raises(ValueError, match="own topology"):
        StaticOracle(topologies.build("tiny"), paths=paths)
    with pytest.raises(ValueError, match="base latencies"):
        StaticOracle(topo, {t: 2 * ms for t, ms in BASE_LATENCY_MS_BY_TIER.items()}, paths=paths)
    faulted = PathTable(topo)
    faulted.set_link(*topo.links[0].key, rate_gbps=1.0)
    with pytest.raises(ValueError, match="no link faults"):
        StaticOracle(topo, paths=faulted)
