"""Topology descriptions: counts, tiers, rates, oversubscription, paths. No root."""

from __future__ import annotations

import pytest

import topologies
from topologies import TopologyError


@pytest.fixture(scope="module")
def fattree() -> topologies.Topology:
    return topologies.build("fattree")


def test_default_fattree_counts_per_tier(fattree: topologies.Topology) -> None:
    assert len(fattree.gpus) == 64
    assert fattree.count_by_tier() == {0: 8, 1: 4, 2: 4, 3: 2}
    assert fattree.links_by_tier() == {0: 64, 1: 8, 2: 8, 3: 8}
    assert len(fattree.switches) == 18 and len(fattree.links) == 88


def test_rates_and_oversubscription(fattree: topologies.Topology) -> None:
    rates = {tier: {l.rate_gbps for l in fattree.links if l.tier == tier} for tier in range(4)}
    assert rates == {0: {1600.0}, 1: {400.0}, 2: {400.0}, 3: {200.0}}
    over = fattree.oversubscription()
    assert over[1] == pytest.approx(1.0)  # ToR: 2 x 400 down, 2 x 400 up
    assert over[2] == pytest.approx(2.0)  # aggregation: 2 x 400 down, 2 x 200 up
    heavier = topologies.build("fattree", {"agg_oversub": 4, "tor_oversub": 2})
    assert heavier.oversubscription()[1] == pytest.approx(2.0)
    assert heavier.oversubscription()[2] == pytest.approx(4.0)


@pytest.mark.parametrize("src,dst,tier,switches", [
    ("g0", "g1", 0, 1),     # same server
    ("g0", "g8", 1, 3),     # same rack, other server
    ("g0", "g16", 2, 5),    # same pod, other rack
    ("g0", "g32", 3, 7),    # other pod
    ("g63", "g0", 3, 7),
])
def test_path_length_by_tier(fattree: topologies.Topology, src: str, dst: str, tier: int, switches: int) -> None:
    path = fattree.path(src, dst)
    assert path[0] == src and path[-1] == dst
    assert len(path) - 2 == switches
    assert fattree.tier_distance(src, dst) == tier
    tiers_on_path = [fattree.node(n).tier for n in path[1:-1]]
    assert max(tiers_on_path) == tier


def test_equal_cost_paths_are_spread_deterministically(fattree: topologies.Topology) -> None:
    cross_pod = fattree.shortest_paths("g0", "g32")
    assert len(cross_pod) == 8  # 2 aggs up x 2 cores x 2 aggs down
    used = {tuple(fattree.path(f"g{s}", f"g{d}")[3:6]) for s in range(16) for d in range(32, 48)}
    assert len(used) > 1, "every pair took the same core path: no spreading"
    again = topologies.build("fattree")
    assert all(again.path(f"g{s}", "g40") == fattree.path(f"g{s}", "g40") for s in range(32))


def test_names_dpids_addresses_unique(fattree: topologies.Topology) -> None:
    dpids = [s.dpid for s in fattree.switches]
    assert len(set(dpids)) == len(dpids) and 0 not in dpids
    ips = [fattree.ip_of(g.name) for g in fattree.gpus]
    macs = [fattree.mac_of(g.name) for g in fattree.gpus]
    assert len(set(ips)) == 64 and len(set(macs)) == 64
    assert fattree.ip_of("g0") == "10.0.0.1" and fattree.gpu_by_ip("10.0.0.64") == "g63"
    assert topologies.gpu_ip(300) == "10.0.1.45"


def test_ports_match_links(fattree: topologies.Topology) -> None:
    for node in fattree.nodes:
        ports = [l.port_of(node) for l in fattree.links_of(node)]
        assert sorted(ports) == list(range(1, len(ports) + 1))


def test_leafspine_and_tiny() -> None:
    ls = topologies.build("leafspine")
    assert len(ls.gpus) == 16 and ls.count_by_tier() == {1: 4, 2: 2}
    assert ls.tier_distance("g0", "g1") == 1 and ls.tier_distance("g0", "g4") == 2
    assert ls.oversubscription()[1] == pytest.approx(2.0)
    tiny = topologies.build("tiny")
    assert len(tiny.gpus) == 4 and len(tiny.switches) == 6
    assert len(tiny.shortest_paths("g0", "g2")) == 2


@pytest.mark.parametrize("name,params,fragment", [
    ("fattree", {"podz": 2}, "unknown parameter 'podz'"),
    ("fattree", {"pods": 0}, "pods must be >= 1"),
    ("fattree", {"pods": "two"}, "pods must be a whole number"),
    ("fattree", {"pods": 2.5}, "whole number"),
    ("fattree", {"pods": 2, "cores": 0}, "needs cores >= 1"),
    ("fattree", {"pods": 1}, "no use for core switches"),
    ("fattree", {"gpu_link_gbps": -1}, "gpu_link_gbps must be >="),
    ("fattree", {"gpus_per_server": 1000, "servers_per_rack": 100}, "address plan"),
    ("leafspine", {"spines": "x"}, "spines must be a whole number"),
    ("tiny", {"pods": 1}, "unknown parameter 'pods'"),
    ("clos", {}, "unknown topology 'clos'"),
])
def test_bad_parameters_raise_one_clear_error(name: str, params: dict[str, object], fragment: str) -> None:
    with pytest.raises(TopologyError, match=fragment.replace("(", r"\(")):
        topologies.build(name, params)


def test_parse_params() -> None:
    assert topologies.parse_params(["pods=4", " cores = 2"]) == {"pods": "4", "cores": "2"}
    for bad in (["pods"], ["=3"], ["pods="], ["pods=1", "pods=2"]):
        with pytest.raises(TopologyError):
            topologies.parse_params(bad)


# -- per-GPU NICs (rail-optimised servers) ---------------------------------------------------

def _rates(topo: topologies.Topology) -> dict[int, set[float]]:
    return {tier: {l.rate_gbps for l in topo.links if l.tier == tier} for tier in range(4)}


@pytest.mark.parametrize("gpus, nic", [(8, 400.0), (8, 200.0), (4, 100.0)])
def test_gpu_nic_sets_the_server_uplink(gpus: int, nic: float) -> None:
    topo = topologies.build("fattree", {"gpus_per_server": gpus, "gpu_nic_gbps": nic})
    shared = topologies.build("fattree", {"gpus_per_server": gpus})
    uplink = gpus * nic
    rates, base = _rates(topo), _rates(shared)
    assert rates[0] == base[0] == {1600.0}                       # NVLink domain unchanged
    assert rates[1] == {uplink}                                  # the server's NICs together
    # ToR uplinks keep tor_oversub 1: 2 servers' uplinks over 2 aggregation switches
    assert rates[2] == {2 * uplink / 2}
    # core links keep agg_oversub 2: 2 racks' ToR uplinks over 2 cores, halved
    assert rates[3] == {2 * uplink / (2 * 2.0)}
    assert topo.params["server_uplink_gbps"] == uplink and topo.params["gpu_nic_gbps"] == nic
    over, base_over = topo.oversubscription(), shared.oversubscription()
    assert (over[1], over[2]) == (base_over[1], base_over[2]) == (1.0, 2.0)
    assert over[0] == gpus * 1600.0 / uplink                     # NVLink capacity over the NICs
    # the recorded parameters rebuild the same fabric
    assert _rates(topologies.build("fattree", topo.params)) == rates


def test_gpu_nic_off_by_default_and_contradiction_refused() -> None:
    topo = topologies.build("fattree")
    assert topo.params["gpu_nic_gbps"] == 0.0 and _rates(topo)[1] == {400.0}
    assert _rates(topologies.build("fattree", {"gpu_nic_gbps": 50, "server_uplink_gbps": 400}))[1] == {400.0}
    with pytest.raises(topologies.TopologyError, match=r"gpu_nic_gbps=400 sets the server uplink to .* = 3200; "
                                                        r"server_uplink_gbps=100.0 contradicts it"):
        topologies.build("fattree", {"gpu_nic_gbps": 400, "server_uplink_gbps": 100})
    with pytest.raises(topologies.TopologyError, match="gpu_nic_gbps must be >= 0.0, got -1"):
        topologies.build("fattree", {"gpu_nic_gbps": -1})
    with pytest.raises(topologies.TopologyError, match="gpu_nic_gbps must be a number, got 'fast'"):
        topologies.build("fattree", {"gpu_nic_gbps": "fast"})


LARGE_FATTREE = {"gpus_per_server": 8, "servers_per_rack": 2, "racks_per_pod": 4, "aggs_per_pod": 4,
                 "cores": 4, "pods": 16}  # 1,024 GPUs: 64 equal-cost paths between pods


@pytest.mark.parametrize("name, params, stride", [
    ("fattree", {}, 1), ("leafspine", {}, 1), ("tiny", {}, 1), ("fattree", LARGE_FATTREE, 101)])
def test_installed_path_is_the_sorted_candidates_pick(name: str, params: dict[str, object], stride: int) -> None:
    """Topology.path walks to the pick without listing the candidates; it must
    land where indexing the sorted list of every shortest path does (the rule
    the controller, /path and the oracle share)."""
    from topologies.model import pick_path

    topo = topologies.build(name, params)
    ends = topo.gpu_names() if stride > 1 else list(topo.nodes)  # small fabrics: switches too
    pairs = [(s, d) for s in ends for d in ends if s != d][::stride]
    assert len(pairs) >= 12
    for s, d in pairs:
        assert topo.path(s, d) == pick_path(topo.shortest_paths(s, d), s, d), (s, d)


def test_installed_path_keeps_no_candidate_lists() -> None:
    """At 1,024 GPUs a pair's candidates cost 8 kB; the installed path must not
    keep them (the simulator asks for every prefill-decode pair)."""
    topo = topologies.build("fattree", LARGE_FATTREE)
    gpus = topo.gpu_names()
    for d in gpus[::7]:
        for s in gpus[::5]:
            if s != d:
                topo.path_hops(s, d)
    assert topo._path_cache == {}
    hops = topo.path_hops("g0", gpus[-1])
    assert len(hops) == 8 and hops[0] is topo.path_hops("g0", "g1")[0]  # shared hop tuples


def test_fattree_at_scales_the_default_pod() -> None:
    from topologies.catalog import fattree_at

    assert topologies.build("fattree", fattree_at(64)).summary() == topologies.build("fattree").summary()
    big = topologies.build("fattree", fattree_at(1024))
    default = topologies.build("fattree")
    assert len(big.gpus) == 1024 and big.count_by_tier()[3] == default.count_by_tier()[3]
    assert big.oversubscription() == default.oversubscription()
    assert {l.tier: l.rate_gbps for l in big.links} == {l.tier: l.rate_gbps for l in default.links}
    for bad in (32, 100, 0, True):
        with pytest.raises(TopologyError, match="whole pods of 32 GPUs"):
            fattree_at(bad)  # type: ignore[arg-type]
