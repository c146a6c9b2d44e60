"""NetKV's live path (a list of DecodeViews, the telemetry oracle's transfer
table) against the rule computed the slow way, one oracle ``estimate`` per
candidate: same decode, same cost to the bit, same tie-break.  The states are
random: loads, missing and aged samples, several snapshots per oracle (each
one a table rebuild), prefix caches, counters, ties (uniform loads make
equal costs), the order of the views.  Also: the oracle's vectorized table
holds exactly what ``transfer_model`` answers, with or without ``prepare``.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import pytest

import topologies
from netkv.oracle import StaleOracle, TelemetryOracle
from netkv.request import BLOCK_TOKENS, DecodeView, Request
from netkv.schedulers import NoEligibleDecode, create
from netkv.schedulers.netkv import NetKVScheduler
from netkv.telemetry import LinkSample, TelemetrySnapshot
from topologies.model import Topology

NOW = 5_000.0
KV_BYTES_PER_TOKEN = 131_072


@pytest.fixture(scope="module")
def topo() -> Topology:
    return topologies.build("fattree", {"pods": 4})  # 128 GPUs: 64 decodes in the mixed placement


def random_snapshot(topo: Topology, rng: random.Random, now_s: float) -> TelemetrySnapshot:
    """Every directed hop loaded at random, or all at one load (ties); a few
    hops missing or measured long ago in some states."""
    uniform = rng.random() < 0.3
    level = rng.uniform(0.0, 1.1)
    missing = rng.random() < 0.2
    aged = rng.random() < 0.3
    samples = {}
    for link in topo.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            if missing and rng.random() < 0.03:
                continue
            t_s = now_s - rng.uniform(0.0, 0.6)
            if aged and rng.random() < 0.05:
                t_s = now_s - rng.uniform(1.5, 4.0)  # around and past the 2 s default max age
            load = (level if uniform else rng.uniform(0.0, 1.1)) * link.rate_gbps
            samples[(x, y)] = LinkSample(x, y, t_s, load, link.rate_gbps, load / link.rate_gbps)
    return TelemetrySnapshot(samples)


def random_views(names: Sequence[str], rng: random.Random, universe: int) -> list[DecodeView]:
    views = []
    plain = rng.random() < 0.3  # identical idle decodes without cache: ties inside every tier
    for name in names:
        if plain:
            views.append(DecodeView(name, 0, 0, 8, 10**6, frozenset(), 4))
            continue
        cached: set[int] = set()
        for _ in range(rng.randrange(0, 3)):
            start = rng.randrange(0, universe)
            cached.update(range(start, start + rng.randrange(1, 12)))
        views.append(DecodeView(name, rng.randrange(0, 6), rng.randrange(0, 10), 8,
                                rng.choice([0, 5_000, 40_000, 10**6]), frozenset(cached), 4,
                                rng.randrange(0, 50_000)))
    rng.shuffle(views)
    return views


def random_request(rng: random.Random, universe: int, i: int) -> Request:
    blocks = rng.randrange(0, 24)
    start = rng.randrange(0, universe)
    return Request(f"r{i}", 0.0, blocks * BLOCK_TOKENS + rng.randrange(0, BLOCK_TOKENS),
                   rng.randrange(1, 400), tuple(range(start, start + blocks)))


def slow_choice(s: NetKVScheduler, r: Request, prefill: str, views: Sequence[DecodeView], oracle: Any,
                now_s: float) -> tuple[tuple[str, float, int], list[float]]:
    """The documented rule, one ``oracle.estimate`` per eligible candidate
    (``cost_of``): the cheapest of the nearest tier holding a candidate within
    the band; equal costs go to the smaller name.  Also every eligible cost."""
    best: dict[int, tuple[float, str]] = {}
    costs = []
    for d in views:
        if not d.eligible(r):
            continue
        cost, _, est = s.cost_of(r, prefill, d, oracle, now_s)
        costs.append(cost)
        if est.tier not in best or (cost, d.name) < best[est.tier]:
            best[est.tier] = (cost, d.name)
    if not best:
        raise NoEligibleDecode("none")
    limit = s.band_limit(min(c for c, _ in best.values()))
    tier = min(t for t, (c, _) in best.items() if c <= limit)
    return (best[tier][1], best[tier][0], tier), costs


def scheduler(rng: random.Random) -> NetKVScheduler:
    s = create("netkv", {"tier_tolerance": rng.choice([0.0, 0.1, 0.5]), "w_load": rng.choice([0.0, 1.0, 3.0]),
                         "w_transfer": rng.choice([0.0, 1.0, 2.0])}, kv_bytes_per_token=KV_BYTES_PER_TOKEN)
    assert isinstance(s, NetKVScheduler)
    return s


@pytest.mark.parametrize("prepared", [False, True])
def test_live_path_chooses_what_the_rule_says(topo: Topology, prepared: bool) -> None:
    rng = random.Random(11 + prepared)
    gpus = topo.gpu_names()
    decodes, prefills = gpus[1::2], gpus[0::2]
    universe = 200
    checked = ties = 0
    for state in range(40):
        s = scheduler(rng)
        snap = [random_snapshot(topo, rng, NOW)]
        oracle = TelemetryOracle(topo, lambda: snap[0])
        reference = TelemetryOracle(topo, lambda: snap[0])
        now = NOW
        for step in range(25):
            if step % 5 == 4:  # a new poll: every table is rebuilt (or prepared)
                now += 0.5
                snap[0] = random_snapshot(topo, rng, now)
                if prepared:
                    oracle.prepare(snap[0], now - 0.01)
            now += rng.uniform(0.0, 0.1)
            r = random_request(rng, universe, step)
            views = random_views(rng.sample(decodes, rng.choice([1, 5, 64])), rng, universe)
            prefill = rng.choice(prefills[:6])
            try:
                want, costs = slow_choice(s, r, prefill, views, reference, now)
            except NoEligibleDecode:
                with pytest.raises(NoEligibleDecode):
                    s.choose(r, prefill, views, oracle, now)
                continue
            got = s.choose(r, prefill, views, oracle, now)
            assert (got.decode, got.score_terms["cost"], int(got.score_terms["tier"])) == want, (state, step)
            assert got.estimate is not None and got.estimate.tier == want[2]
            ref_cost, ref_load, ref_est = s.cost_of(r, prefill, next(v for v in views if v.name == got.decode),
                                                     reference, now)
            assert got.score_terms["load_ms"] == ref_load
            assert got.score_terms["transfer_ms"] == ref_est.transfer_ms
            assert got.bytes_to_send == got.tokens_to_send * KV_BYTES_PER_TOKEN
            ties += len(costs) != len(set(costs))
            checked += 1
    assert checked > 500 and ties > 50  # the states did exercise the tie-break


@pytest.mark.parametrize("prepared", [False, True])
def test_transfer_table_is_transfer_model(topo: Topology, prepared: bool) -> None:
    rng = random.Random(5)
    gpus = topo.gpu_names()
    for state in range(12):
        snap = random_snapshot(topo, rng, NOW)
        oracle = TelemetryOracle(topo, lambda: snap, max_age_ms=rng.choice([None, 500.0, 2000.0]))
        src = rng.choice(gpus)
        now = NOW + rng.uniform(-0.1, 2.5)
        oracle.transfer_table(src, now)  # the source is now in use: prepare() makes its table
        if prepared:
            snap = random_snapshot(topo, rng, NOW)  # the source's next answer
            oracle.prepare(snap, now)
        now += 1e-6  # a later decision (the source is read once per distinct time)
        table = oracle.transfer_table(src, now)
        if prepared:
            assert oracle._prepared is not None and table is oracle._prepared[2][src]
        for dst in gpus:
            assert table[dst] == oracle.transfer_model(src, dst, now), (state, src, dst)
            est = oracle.estimate(src, dst, 10**9, now)
            assert est.transfer_ms == table[dst][1] + 10**9 * table[dst][2]
        assert table.valid_until_s >= now


def test_prepared_table_is_used_only_where_it_is_valid(topo: Topology) -> None:
    rng = random.Random(3)
    snap = random_snapshot(topo, rng, NOW)
    source = [snap]
    oracle = TelemetryOracle(topo, lambda: source[0], max_age_ms=2000.0)
    oracle.transfer_table("g0", NOW)
    new = TelemetrySnapshot({h: LinkSample(s.src, s.dst, NOW + 1.0, s.load_gbps, s.capacity_gbps, s.utilization)
                             for h, s in snap.samples.items()})
    oracle.prepare(new, NOW + 1.0)
    source[0] = new
    assert oracle._prepared is not None
    prepared = oracle._prepared[2]["g0"]
    assert prepared.valid_until_s == pytest.approx(NOW + 3.0)
    # asked before the table's creation time: computed afresh
    early = oracle.transfer_table("g0", NOW + 0.5)
    assert early is not prepared
    # another snapshot than the prepared one: computed afresh
    oracle2 = TelemetryOracle(topo, lambda: new)
    oracle2.prepare(random_snapshot(topo, rng, NOW + 1.0), NOW + 1.0)
    assert oracle2.transfer_table("g0", NOW + 1.2) is not None
    # within its validity: the prepared table; past it: a new one with the samples aged out
    source3 = [snap]
    oracle3 = TelemetryOracle(topo, lambda: source3[0], max_age_ms=2000.0)
    oracle3.transfer_table("g0", NOW)
    oracle3.prepare(new, NOW + 1.0)
    source3[0] = new
    assert oracle3.transfer_table("g0", NOW + 1.5) is oracle3._prepared[2]["g0"]  # type: ignore[index]
    late = oracle3.transfer_table("g0", NOW + 3.5)
    assert late is not oracle3._prepared[2]["g0"]  # type: ignore[index]
    assert late["g64"] == oracle3.transfer_model("g0", "g64", NOW + 3.5)
    assert late["g64"][2] == oracle3.paths.get("g0", "g64").static_ms_per_byte  # aged out: static


def test_stale_oracle_table_is_its_transfer_model(topo: Topology) -> None:
    rng = random.Random(8)
    snaps = {NOW + k * 0.5: random_snapshot(topo, rng, NOW + k * 0.5) for k in range(6)}
    clock = [NOW]

    def source() -> TelemetrySnapshot:
        return snaps[max(t for t in snaps if t <= clock[0])]

    oracle = StaleOracle(topo, source, delay_ms=700.0)
    for k in range(6):
        clock[0] = NOW + k * 0.5 + 0.1
        table = oracle.transfer_table("g2", clock[0])
        for dst in topo.gpu_names()[::7]:
            assert table[dst] == oracle.transfer_model("g2", dst, clock[0])


def test_warmed_sources_get_prepared_tables_before_their_first_decision(topo: Topology) -> None:
    # A source never asked about is not prepared (the poller would build tables
    # nobody reads); one warmed at start-up is, from the next snapshot on, so
    # its first decision reads a prepared table instead of building one.
    rng = random.Random(5)
    snap = random_snapshot(topo, rng, NOW)
    source = [snap]
    oracle = TelemetryOracle(topo, lambda: source[0], max_age_ms=None)
    oracle.warm(["g0", "g16"])
    new = random_snapshot(topo, rng, NOW + 1.0)
    oracle.prepare(new, NOW + 1.0)
    source[0] = new
    assert oracle._prepared is not None
    assert set(oracle._prepared[2]) == {"g0", "g16"}
    assert oracle.transfer_table("g16", NOW + 1.2) is oracle._prepared[2]["g16"]
    assert oracle.transfer_table("g0", NOW + 1.2) is oracle._prepared[2]["g0"]
    fresh = oracle.transfer_table("g32", NOW + 1.2)  # not warmed: built in the call
    assert fresh is not oracle._prepared[2].get("g32")
    assert fresh["g64"] == oracle.transfer_model("g32", "g64", NOW + 1.2)
