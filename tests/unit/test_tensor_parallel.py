"""Tensor-parallel instances: placement grouping, the refusal of servers that
cannot hold whole instances, and the oracle's cost of a TP transfer (no root)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from lab.experiment import ExperimentConfig, prepare
from lab.transfers import ideal_ms, idle_transfers
from netkv import perfmodel
from netkv.oracle import StaticOracle, TelemetryOracle, TensorParallelOracle
from netkv.placement import PlacementError, make_placement, tier_mix, tp_instances
from netkv.records import read_records, validate_file
from netkv.serving.config import ReplayConfig
from netkv.telemetry import LinkSample, TelemetrySnapshot, constant_source
from netkv.traces import DEFAULT_TRACE
from topologies import catalog
from topologies.model import Topology
from workers.launch import LocalLauncher
from workers.run import replay

NOW = 1_000.0
TP4 = perfmodel.build("llama-3.1-70b")  # TP 4 by default


def test_tp4_instances_are_four_consecutive_gpus_of_one_server() -> None:
    topo = catalog.build("fattree")
    groups = tp_instances(topo, 4)
    assert len(groups) == 16
    assert groups[:3] == [("g0", "g1", "g2", "g3"), ("g4", "g5", "g6", "g7"), ("g8", "g9", "g10", "g11")]
    for g in groups:
        assert len({topo.node(h).server for h in g}) == 1
    assert tp_instances(topo, 8)[1] == tuple(f"g{i}" for i in range(8, 16))


def test_mixed_alternates_instances_and_names_them_by_rank_0() -> None:
    topo = catalog.build("fattree")
    p = make_placement(topo, tp=4)
    assert p.tp == 4 and len(p.prefill) == len(p.decode) == 8
    assert p.prefill[:2] == ("g0", "g8") and p.decode[:2] == ("g4", "g12")
    assert p.ranks_of("g4") == ("g4", "g5", "g6", "g7")
    assert p.role_of("g6") == "decode" and p.role_of("g4") == "decode" and p.role_of("g9") == "prefill"
    assert len(p.hosts) == 64 and p.instances == p.prefill + p.decode
    assert set(tier_mix(topo, p)) == {0, 1, 2, 3}  # a decode on the same server, rack, pod, and across the core
    d = p.as_dict()
    assert d["tp"] == 4 and d["ranks"]["g0"] == ["g0", "g1", "g2", "g3"] and d["prefill"][0] == "g0"
    # TP 8: one instance per server, so mixed alternates servers.
    p8 = make_placement(topo, tp=8)
    assert p8.prefill[:2] == ("g0", "g16") and p8.decode[:2] == ("g8", "g24")


def test_tp1_placement_is_unchanged() -> None:
    topo = catalog.build("fattree")
    p = make_placement(topo)
    assert p == make_placement(topo, tp=1)
    assert p.as_dict() == {"scheme": "mixed", "prefill": list(p.prefill), "decode": list(p.decode)}
    assert p.ranks_of("g1") == ("g1",) and p.hosts == p.prefill + p.decode


def test_split_schemes_and_explicit_take_whole_instances() -> None:
    topo = catalog.build("fattree")
    racks = make_placement(topo, {"scheme": "split-racks"}, tp=4)
    assert min(tier_mix(topo, racks)) == 2 and len(racks.prefill) == 8
    pods = make_placement(topo, {"scheme": "split-pods"}, tp=4)
    assert set(tier_mix(topo, pods)) == {3}
    explicit = make_placement(topo, {"scheme": "explicit", "prefill": ["g3", "g2", "g1", "g0"],
                                     "decode": [f"g{i}" for i in range(60, 64)]}, tp=4)
    assert explicit.prefill == ("g0",) and explicit.decode == ("g60",)
    assert explicit.ranks_of("g0") == ("g0", "g1", "g2", "g3")
    part = make_placement(topo, {"scheme": "mixed", "hosts": [f"g{i}" for i in range(16)]}, tp=4)
    assert part.prefill == ("g0", "g8") and part.decode == ("g4", "g12")


@pytest.mark.parametrize(
    "topology, params, tp, message",
    [
        ("tiny", {}, 4, "tp=4: topology tiny has servers of 2 GPUs, which cannot hold whole instances of 4 GPUs"),
        ("fattree", {"gpus_per_server": 6}, 4, "has servers of 6 GPUs, which cannot hold whole instances of 4"),
        ("leafspine", {}, 2, "tp=2: topology leafspine has no servers"),
    ],
)
def test_servers_that_cannot_hold_whole_instances_are_refused_in_one_line(
    topology: str, params: dict[str, Any], tp: int, message: str
) -> None:
    with pytest.raises(PlacementError, match=message) as info:
        make_placement(catalog.build(topology, params), tp=tp)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"scheme": "explicit", "prefill": ["g0", "g1"], "decode": ["g4", "g5", "g6", "g7"]},
         r"names part of TP instance g0 \(g0, g1, g2, g3\) but not g2, g3"),
        ({"scheme": "mixed", "hosts": ["g0", "g1", "g2", "g3", "g4"]}, "takes 1 of the 4 GPUs of TP instance g4"),
        ({"scheme": "mixed", "hosts": ["g0", "g1", "g2", "g3"]}, "gives 1 prefill and 0 decode instances of 4 GPUs"),
        ({"scheme": "explicit", "prefill": ["g0", "g1", "g2", "g3"], "decode": ["g3", "g2", "g1", "g0"]},
         r"TP instance g0 \(g0, g1, g2, g3\) is listed as both prefill and decode"),
    ],
)
def test_bad_tp_placements_are_refused(config: dict[str, Any], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        make_placement(catalog.build("fattree"), config, tp=4)


def test_tp_must_be_a_whole_number() -> None:
    with pytest.raises(PlacementError, match="tp must be a whole number >= 1, got 0"):
        make_placement(catalog.build("fattree"), tp=0)


# -- the oracle's cost of a TP transfer ------------------------------------------
def tp_oracle(topo: Topology, inner: Any) -> TensorParallelOracle:
    p = make_placement(topo, tp=4)
    return TensorParallelOracle(inner, {i: p.ranks_of(i) for i in p.instances}, TP4.rank_flow_bytes)


def test_tp_cost_inside_a_server_is_the_slowest_rank_flow() -> None:
    topo = catalog.build("fattree")
    static = StaticOracle(topo)
    oracle = tp_oracle(topo, static)
    size = 4096 * TP4.kv_bytes_per_token + 3  # an uneven split: ranks 0-2 carry one byte more
    flows = TP4.rank_flow_bytes(size)
    # g0-g3 to g4-g7: every rank has its own GPU links, no hop is shared
    est = oracle.estimate("g0", "g4", size, NOW)
    per_rank = [static.estimate(f"g{i}", f"g{4 + i}", b, NOW).transfer_ms for i, b in enumerate(flows)]
    assert est.transfer_ms == max(per_rank) == per_rank[0]
    assert est.tier == 0 == oracle.tier("g0", "g4") and est.source == "static"


def test_tp_flows_share_the_hops_they_have_in_common() -> None:
    topo = catalog.build("fattree")
    static = StaticOracle(topo)
    oracle = tp_oracle(topo, static)
    size = 4096 * TP4.kv_bytes_per_token
    b = size // 4
    # Recomputed from Topology.path: each rank's path, each hop's rate shared by the rank flows crossing it.
    paths = [topo.path(f"g{i}", f"g{36 + i}") for i in range(4)]
    crossing: dict[tuple[str, str], int] = {}
    for path in paths:
        for hop in zip(path, path[1:]):
            crossing[hop] = crossing.get(hop, 0) + 1
    assert crossing[("v0", "t0")] == 4  # one server uplink for all four ranks
    share_gbps = [min(topo.link_between(*h).rate_gbps / crossing[h] for h in zip(p, p[1:])) for p in paths]
    base = static.estimate("g0", "g36", 0, NOW).base_latency_ms
    est = oracle.estimate("g0", "g36", size, NOW)
    assert est.transfer_ms == pytest.approx(base + b * 8 / (min(share_gbps) * 1e6), rel=1e-12)
    assert est.available_gbps == min(share_gbps) <= 100.0  # at most a quarter of the 400 Gbit/s uplink
    assert est.tier == 3 == oracle.tier("g0", "g36")
    # Priced alone, each rank would see the whole uplink: at least twice too cheap.
    alone = max(static.estimate(f"g{i}", f"g{36 + i}", b, NOW).transfer_ms for i in range(4))
    assert est.transfer_ms > 1.9 * alone


def test_tp_cost_is_the_slowest_rank_under_telemetry() -> None:
    topo = catalog.build("fattree")
    samples = {}
    for link in topo.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            samples[(x, y)] = LinkSample(x, y, NOW, 0.0, link.rate_gbps, 0.0)
    # Load only the path of rank 2 (g2 -> g38): its GPU link into its server switch.
    hop = topo.path("g2", "g38")[:2]
    assert hop[0] == "g2"
    cap = samples[(hop[0], hop[1])].capacity_gbps
    samples[(hop[0], hop[1])] = LinkSample(hop[0], hop[1], NOW, cap * 0.999, cap, 0.999)
    telemetry = TelemetryOracle(topo, constant_source(TelemetrySnapshot(samples)))
    oracle = tp_oracle(topo, telemetry)
    size = 8192 * TP4.kv_bytes_per_token
    per_rank = oracle.rank_estimates("g0", "g36", size, NOW)
    assert [e.transfer_ms for e in per_rank].index(max(e.transfer_ms for e in per_rank)) == 2
    est = oracle.estimate("g0", "g36", size, NOW)
    assert est.transfer_ms == per_rank[2].transfer_ms == telemetry.estimate("g2", "g38", size // 4, NOW).transfer_ms
    assert est.source == "telemetry" and est.telemetry_age_ms == 0.0
    # A rank pair without telemetry makes the whole answer a fallback, naming the rank.
    del samples[(hop[0], hop[1])]
    missing = tp_oracle(topo, TelemetryOracle(topo, constant_source(TelemetrySnapshot(samples))))
    est = missing.estimate("g0", "g36", size, NOW)
    assert est.source == "static-fallback" and est.reason.startswith("rank 2: no telemetry for hop g2->")


def test_tp_oracle_refuses_unknown_instances_and_bad_splits() -> None:
    topo = catalog.build("fattree")
    oracle = tp_oracle(topo, StaticOracle(topo))
    with pytest.raises(ValueError, match="g1 is not a tensor-parallel instance"):
        oracle.estimate("g1", "g4", 10, NOW)
    bad = TensorParallelOracle(StaticOracle(topo), {"g0": ("g0", "g1"), "g4": ("g4", "g5")}, lambda n: [n])
    with pytest.raises(ValueError, match="needs 2 flows adding up to the size"):
        bad.estimate("g0", "g4", 10, NOW)
    with pytest.raises(ValueError, match="same number"):
        TensorParallelOracle(StaticOracle(topo), {"g0": ("g0", "g1"), "g4": ("g4",)}, TP4.rank_flow_bytes)


# -- a replay with real worker processes on 127.0.0.1 ---------------------------------
# Two 8-GPU servers in two racks: TP-4 instances P g0, D g4, P g8, D g12 (mixed).
TP_FABRIC = {"gpus_per_server": 8, "servers_per_rack": 1, "racks_per_pod": 2, "pods": 1, "aggs_per_pod": 2,
             "cores": 0, "agg_oversub": 1}


def tp_config(**kw: Any) -> ReplayConfig:
    cfg: dict[str, Any] = dict(
        trace_path=str(DEFAULT_TRACE), topology="fattree", topology_params=TP_FABRIC, model="llama-3.1-70b",
        scheduler="netkv", oracle="static", perf_overrides={"prefill_mfu": 1.0, "decode_hbm_efficiency": 1.0},
        max_requests=12, rate_multiplier=4.0, drain_timeout_s=60.0, scale_factor=1000.0,
    )
    cfg.update(kw)
    return ReplayConfig(**cfg)


def test_tp_replay_moves_every_transfer_as_tp_rank_flows(short_dir: Path) -> None:
    cfg = tp_config()
    run = short_dir / "r"
    summary = replay(cfg, LocalLauncher(), run)
    records = read_records(run / "records.jsonl")
    assert summary["requests"] == len(records) == 12 and summary["problems"] == []
    assert validate_file(run / "records.jsonl") == []
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records if r["status"] != "ok"]
    info = json.loads((run / "run.json").read_text())
    assert info["placement"]["tp"] == 4 and info["placement"]["prefill"] == ["g0", "g8"]
    assert info["placement"]["ranks"]["g12"] == ["g12", "g13", "g14", "g15"]
    assert sorted(info["workers"]) == ["g0", "g12", "g4", "g8"]  # one process per instance
    rank_addrs = info["rank_data_addrs"]
    assert len({tuple(a) for addrs in rank_addrs.values() for a in addrs}) == 8  # a listener per decode rank
    perf = perfmodel.build("llama-3.1-70b", overrides=cfg.perf_overrides)
    topo = catalog.build("fattree", TP_FABRIC)
    placement = make_placement(topo, tp=4)
    oracle = TensorParallelOracle(StaticOracle(topo), {i: placement.ranks_of(i) for i in placement.instances},
                                  perf.rank_flow_bytes)
    logs = {d: (run / "logs" / f"{d}.log").read_text() for d in ("g4", "g12")}
    for r in records:
        assert r["prefill"] in ("g0", "g8") and r["decode"] in ("g4", "g12")
        assert r["tier_distance"] == topo.tier_distance(r["prefill"], r["decode"])
        flows = [math.ceil(b / cfg.scale_factor) for b in perf.rank_flow_bytes(r["kv_bytes"])]
        assert r["bytes_sent"] == sum(flows)
        # the scheduler priced the transfer as its slowest rank flow
        assert r["estimate_transfer_ms"] == oracle.estimate(r["prefill"], r["decode"], r["kv_bytes"], 0.0).transfer_ms
        # the decode instance received one flow per rank, each on that rank's listener, of that rank's bytes
        lines = [ln for ln in logs[r["decode"]].splitlines() if f" KV {r['request_id']} complete: " in ln]
        assert len(lines) == 1, lines
        parts = lines[0].split(" complete: ")[1].split("; ")
        assert len(parts) == 4
        for i, part in enumerate(parts):
            ip, port = rank_addrs[r["decode"]][i]
            assert part.startswith(f"rank {i} {flows[i]} B 127.0.0.1->{ip}:{port} end "), part
            end_ms = (float(part.rsplit(" ", 1)[1]) - summary["run_start_epoch_s"]) * 1000.0
            assert end_ms <= r["transfer_end_ms"] + 1e-3  # the transfer ends with its last rank
        assert max((float(p.rsplit(" ", 1)[1]) - summary["run_start_epoch_s"]) * 1000.0 for p in parts) \
            == pytest.approx(r["transfer_end_ms"], abs=1e-3)


def test_tp_replay_on_servers_too_small_is_refused_before_any_worker(short_dir: Path) -> None:
    with pytest.raises(PlacementError, match="tp=4: topology tiny has servers of 2 GPUs"):
        replay(tp_config(topology="tiny", topology_params={}), LocalLauncher(), short_dir / "r")
    assert not (short_dir / "r" / "logs").exists()


def test_netkv_run_refuses_a_tp_model_on_small_servers_before_any_network(tmp_path: Path) -> None:
    exp = ExperimentConfig(replay={"model": "llama-3.1-70b"}, out_dir=str(tmp_path / "r"),
                           testbed={"topology": "tiny"}, scenario="none")
    with pytest.raises(PlacementError, match="tp=4: topology tiny has servers of 2 GPUs") as info:
        prepare(exp)
    assert "\n" not in str(info.value) and not (tmp_path / "r").exists()
    fits = ExperimentConfig(replay={"model": "llama-3.1-70b"}, out_dir=str(tmp_path / "f"),
                            testbed={"topology": "fattree", "params": TP_FABRIC}, scenario="none")
    assert prepare(fits)[1].model == "llama-3.1-70b"


# -- the report's ideal time and idle paths of a TP transfer ------------------------------
def test_ideal_time_and_idle_path_of_a_tp_transfer() -> None:
    topo = catalog.build("fattree")
    p = make_placement(topo, tp=4)
    ranks = {i: p.ranks_of(i) for i in p.instances}
    scale = 40_000.0

    def rec(rid: str, src: str, dst: str, start: float, end: float) -> dict[str, Any]:
        return {"request_id": rid, "status": "ok", "prefill": src, "decode": dst, "bytes_sent": 40_000,
                "transfer_start_ms": start, "transfer_end_ms": end, "tier_distance": topo.tier_distance(src, dst)}

    same_server = rec("a", "g0", "g4", 0.0, 100.0)
    # four flows of 10 kB, each on its own 1,600 Gbit/s GPU links
    assert ideal_ms(topo, scale, same_server, ranks) == pytest.approx(10_000 * 8 / (1600e9 / scale) * 1e3)
    # one flow of 40 kB alone is four times longer
    assert ideal_ms(topo, scale, same_server) == pytest.approx(4 * ideal_ms(topo, scale, same_server, ranks))
    # across servers the four flows share the 400 Gbit/s server uplink: as long as one flow of it all
    other_server = rec("b", "g8", "g12", 50.0, 150.0)
    assert ideal_ms(topo, scale, rec("c", "g0", "g12", 0, 1), ranks) == pytest.approx(
        40_000 * 8 / (400e9 / scale) * 1e3)
    idle = idle_transfers(topo, scale, 1500, [same_server, other_server], ranks=ranks, min_ideal_ms=0.0)
    assert [t.request_id for t in idle] == ["a", "b"]  # two servers, no hop in common
    # rank 1 of g0 -> g12 uses g1's GPU link, which rank 1 of g0 -> g4 uses too
    busy = idle_transfers(topo, scale, 1500, [same_server, rec("c", "g0", "g12", 50.0, 150.0)], ranks=ranks,
                          min_ideal_ms=0.0)
    assert busy == []
