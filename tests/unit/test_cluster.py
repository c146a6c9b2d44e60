"""Past one machine (fabric/cluster.py): servers, placement of whole pods,
crossing links and their MTU, the clock-offset arithmetic, the preflight's
logic with canned answers (there is no second server here), and the one-line
refusals of ``netkv up --servers``."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

import topologies
from cli.fabric import cluster_up
from fabric import cluster
from fabric.cluster import ClockSample, ClusterError, CommandResult, Server
from fabric.config import ConfigError, TestbedConfig
from fabric.system import PreflightError

ROOT = Path(__file__).resolve().parents[2]
# bench/simscale.py's shape: whole pods of 64 GPUs under 4 cores
POD_PARAMS = {"gpus_per_server": 8, "servers_per_rack": 2, "racks_per_pod": 4, "aggs_per_pod": 4, "cores": 4}
FIVE = "head=10.0.0.1,s1=10.0.0.2,s2=10.0.0.3,s3=10.0.0.4,s4=10.0.0.5"
REPO = Path("/srv/netkv")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fattree(pods: int) -> topologies.Topology:
    return topologies.build("fattree", {**POD_PARAMS, "pods": pods})


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "Traceback" not in text


# -- servers ------------------------------------------------------------------------
def test_parse_servers_roles_and_defaults() -> None:
    servers = cluster.parse_servers(" head=10.0.0.1 , s1=10.0.0.2")
    assert [(s.name, s.address, s.role) for s in servers] == [("head", "10.0.0.1", "head"),
                                                              ("s1", "10.0.0.2", "worker")]
    assert servers[1].mgmt_mtu_bytes == cluster.DEFAULT_MGMT_MTU_BYTES
    assert servers[1].max_gpus == cluster.DEFAULT_MAX_GPUS
    assert cluster.servers_from_json(cluster.servers_to_json(servers)) == servers


@pytest.mark.parametrize("text,fragment", [
    ("", "--servers is empty"),
    ("head=10.0.0.1,s1", "entry 's1' is not NAME=IPV4"),
    ("head=10.0.0.1,=10.0.0.2", "is not NAME=IPV4"),
    ("Head=10.0.0.1", "server name must be a lowercase letter"),
    ("head=10.0.0.1,s_1=10.0.0.2", "server name must be"),
    ("head=10.0.0.1,s1=10.0.0.256", "address must be an IPv4 address"),
    ("head=10.0.0.1,s1=fd00::2", "address must be an IPv4 address"),
    ("head=10.0.0.1,s1=s1.example", "address must be an IPv4 address"),
    ("head=10.0.0.1,s1=0.0.0.0", "is not the address of one machine"),
    ("head=10.0.0.1,s1=224.0.0.1", "is not the address of one machine"),
    ("head=10.0.0.1,head=10.0.0.2", "name 'head' is given twice"),
    ("head=10.0.0.1,s1=10.0.0.1", "address '10.0.0.1' is given twice"),
    ("head=127.0.0.1,s1=10.0.0.2", "loopback address"),
])
def test_bad_servers_are_one_line(text: str, fragment: str) -> None:
    with pytest.raises(ClusterError, match=fragment) as info:
        cluster.parse_servers(text)
    assert one_line(str(info.value))


@pytest.mark.parametrize("section,fragment", [
    ("head", "servers must be a JSON array"),
    ([["head", "10.0.0.1"]], r"servers\[0\] must be an object"),
    ([{"name": "head", "address": "10.0.0.1", "mtu": 9000}], "unknown key 'mtu'"),
    ([{"name": "head", "address": "10.0.0.1", "mgmt_mtu_bytes": 100}], "mgmt_mtu_bytes must be"),
    ([{"name": "head", "address": "10.0.0.1", "max_gpus": 0}], "max_gpus must be"),
    ([{"name": "head", "address": "10.0.0.1", "max_gpus": True}], "max_gpus must be"),
])
def test_bad_servers_section(section: object, fragment: str) -> None:
    with pytest.raises(ClusterError, match=fragment):
        cluster.servers_from_json(section)


def test_one_machine_config_is_written_as_before(tmp_path: Path) -> None:
    cfg = TestbedConfig()
    out = cfg.to_json()
    assert "servers" not in out  # byte-for-byte the configuration of before the field
    assert cfg.cluster_plan(cfg.validate()) is None
    one = TestbedConfig(servers=cluster.servers_to_json(cluster.parse_servers("head=127.0.0.1")))
    assert one.cluster_plan(one.validate()) is None  # one server: no placement, no tunnels, mtu 1500 fine
    five = TestbedConfig(params={**POD_PARAMS, "pods": 4}, mtu_bytes=1458,
                         servers=cluster.servers_to_json(cluster.parse_servers(FIVE)))
    path = tmp_path / "testbed.json"
    path.write_text(json.dumps(five.to_json()))
    again = TestbedConfig.load(path)
    assert again == five and [s.name for s in again.server_list()] == ["head", "s1", "s2", "s3", "s4"]
    with pytest.raises(ConfigError, match="servers must be a JSON array"):
        TestbedConfig(servers="head=10.0.0.1").validate()  # type: ignore[arg-type]


def test_testbed_of_several_servers_runs_each_command_where_its_node_is(tmp_path: Path) -> None:
    """Nothing is built: the Testbed of three servers knows, from the plan,
    that a pod's GPU host is on its worker and the core on the head, and an
    argv for a node there goes over that server's ssh connection, quoted
    word by word; on the head it is left as it is."""
    from fabric import remote
    from fabric.net import Testbed

    cfg = TestbedConfig(mtu_bytes=1458, servers=cluster.servers_to_json(cluster.parse_servers(
        "head=10.0.0.1,s1=10.0.0.2,s2=10.0.0.3")))
    tb = Testbed(cfg)
    sites = tb.sites
    assert sites.cluster and [s.name for s in sites.workers] == ["s1", "s2"]
    pod0_gpu, pod1_gpu = tb.topo.gpus[0].name, tb.topo.gpus[-1].name
    core = next(sw.name for sw in tb.topo.switches if sw.tier == 3)
    assert sites.server_of(pod0_gpu).name == "s1" and sites.server_of(pod1_gpu).name == "s2"  # type: ignore[union-attr]
    assert sites.server_of(core) is None and sites.on(core, ["tc", "-s", "qdisc"]) == ["tc", "-s", "qdisc"]
    odd = "a b; rm -rf / $(x)"
    argv = sites.on(pod0_gpu, ["echo", odd], {"OVS_RUNDIR": "/run/x y"})
    assert argv[0] == "ssh" and "root@10.0.0.2" in argv and "BatchMode=yes" in argv
    assert f"ControlPath={remote.control_path(tb.run_dir, sites.workers[0])}" in argv
    assert shlex.split(argv[-1]) == ["env", "OVS_RUNDIR=/run/x y", "echo", odd]
    assert tb.parallel == remote.SESSIONS_PER_SERVER


def test_the_clock_bound_is_checked_and_saved_only_with_servers() -> None:
    with pytest.raises(ConfigError, match=r"clock_bound_ms must be 0.01 .. 1000, got 0"):
        TestbedConfig(clock_bound_ms=0).validate()
    assert TestbedConfig().clock_bound_ms == cluster.MAX_CLOCK_UNCERTAINTY_S * 1000
    assert "clock_bound_ms" not in TestbedConfig().to_json()  # one machine: written as before
    two = TestbedConfig(mtu_bytes=1458, clock_bound_ms=20.0,
                        servers=cluster.servers_to_json(cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2")))
    assert TestbedConfig.from_json(two.to_json()).clock_bound_ms == 20.0


# -- placement ------------------------------------------------------------------------
def test_256_gpus_on_head_and_four_workers() -> None:
    topo = fattree(4)
    assert len(topo.gpus) == 256
    servers = cluster.parse_servers(FIVE)
    placement = cluster.place(topo, servers)
    assert placement.pod_server == {0: "s1", 1: "s2", 2: "s3", 3: "s4"}
    for node in topo.nodes.values():
        where = placement.server_of[node.name]
        if node.pod is None:
            assert node.tier == 3 and where == "head"
        else:
            assert where == placement.pod_server[node.pod]
    assert sorted(placement.nodes_on("head")) == ["c0", "c1", "c2", "c3"]
    for worker in ("s1", "s2", "s3", "s4"):
        assert placement.gpus_on(topo, worker) == 64
        assert len(placement.nodes_on(worker)) == 64 + 8 + 4 + 4  # GPUs, server switches, ToRs, aggs
    crossing = cluster.crossing_links(topo, placement, prefix="nk", mtu_bytes=1458, scale=40_000)
    agg_core = [l for l in topo.links if l.tier == 3]
    assert [(c.lower, c.upper) for c in crossing] == [l.key for l in agg_core]
    assert len(crossing) == 16 * 4  # 16 aggregation switches, each to 4 cores
    first = crossing[0]
    assert (first.lower_server.name, first.upper_server.name) == ("s1", "head")
    assert first.gre_key == 1 and len({c.gre_key for c in crossing}) == len(crossing)
    assert first.rate_mbps == pytest.approx(agg_core[0].rate_gbps * 1000 / 40_000)
    row = first.to_json()
    assert row["tunnel"].startswith("gretap key 1 10.0.0.2 (nka0-eth") and row["mtu_bytes"] == 1458
    assert row["underlay_mtu_bytes"] == 1500


def test_two_pods_per_worker_when_they_fit() -> None:
    topo = fattree(4)
    servers = cluster.servers_from_json([{"name": "head", "address": "10.0.0.1"},
                                         {"name": "s1", "address": "10.0.0.2", "max_gpus": 128},
                                         {"name": "s2", "address": "10.0.0.3", "max_gpus": 128}])
    placement = cluster.place(topo, servers)
    assert placement.pod_server == {0: "s1", 1: "s2", 2: "s1", 3: "s2"}  # spread evenly, in order


def test_placement_that_does_not_fit_says_so_in_one_line() -> None:
    topo = fattree(4)
    with pytest.raises(ClusterError, match="placement does not fit: 256 GPUs in 4 pods of 64 GPUs") as info:
        cluster.place(topo, cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2,s2=10.0.0.3"))
    assert "pod 2 fits on no worker" in str(info.value) and one_line(str(info.value))
    # a pod is never split: 64 GPUs do not go into two workers of 32
    small = cluster.servers_from_json([{"name": "head", "address": "10.0.0.1"},
                                       {"name": "s1", "address": "10.0.0.2", "max_gpus": 32},
                                       {"name": "s2", "address": "10.0.0.3", "max_gpus": 32}])
    with pytest.raises(ClusterError, match="pod 0 fits on no worker"):
        cluster.place(fattree(1 + 1), small)
    # and through the configuration, before anything is built
    cfg = TestbedConfig(params={**POD_PARAMS, "pods": 4}, mtu_bytes=1458,
                        servers=cluster.servers_to_json(cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2")))
    with pytest.raises(ConfigError, match="placement does not fit"):
        cfg.validate()


def test_one_server_holds_everything() -> None:
    topo = fattree(4)
    placement = cluster.place(topo, cluster.parse_servers("head=10.0.0.1"))
    assert set(placement.server_of.values()) == {"head"} and len(placement.server_of) == len(topo.nodes)
    assert cluster.crossing_links(topo, placement, prefix="nk", mtu_bytes=1500, scale=40_000) == []


# -- MTU -------------------------------------------------------------------------------------
def test_gretap_overhead_is_42_bytes() -> None:
    # outer IPv4 20 + GRE 4 + key 4 (MCE always sets one) + inner Ethernet 14 (gretap)
    assert cluster.GRETAP_OVERHEAD_BYTES == 42
    assert cluster.max_inner_mtu_bytes(1500) == 1458  # what Linux gives a keyed gretap over 1500
    cluster.check_tunnel_mtu(1458, 1500, "x")
    cluster.check_tunnel_mtu(1500, 1542, "x")


def test_crossing_link_that_would_fragment_is_refused_in_one_line() -> None:
    with pytest.raises(ClusterError, match="mtu_bytes 1459 would fragment") as info:
        cluster.check_tunnel_mtu(1459, 1500, "link a0-c0 between s1 and head")
    assert "use mtu_bytes <= 1458 or a management network with MTU >= 1501" in str(info.value)
    assert one_line(str(info.value))
    cfg = TestbedConfig(servers=cluster.servers_to_json(cluster.parse_servers("head=10.0.0.1,s1=10.0.0.2")))
    with pytest.raises(ConfigError, match="link a0-c0 between s1 and head: mtu_bytes 1500 would fragment"):
        cfg.validate()  # the default MTU on a 1500-byte management network
    jumbo = TestbedConfig(servers=[{"name": "head", "address": "10.0.0.1", "mgmt_mtu_bytes": 9000},
                                   {"name": "s1", "address": "10.0.0.2", "mgmt_mtu_bytes": 9000}])
    jumbo.validate()
    # the tunnel's underlay is the smaller of its two ends
    mixed = TestbedConfig(servers=[{"name": "head", "address": "10.0.0.1", "mgmt_mtu_bytes": 9000},
                                   {"name": "s1", "address": "10.0.0.2", "mgmt_mtu_bytes": 1500}])
    with pytest.raises(ConfigError, match="management MTU 1500"):
        mixed.validate()


# -- one timeline ------------------------------------------------------------------------------
def test_offset_arithmetic_on_known_timestamps() -> None:
    # the server's clock is 0.5 s ahead; 10 ms each way, 2 ms of processing
    s = ClockSample(100.0, 100.510, 100.512, 100.022)
    assert s.offset_s == pytest.approx(0.5)
    assert s.rtt_s == pytest.approx(0.020)
    assert s.uncertainty_s == pytest.approx(0.010)
    # 4 ms there and 16 ms back: the estimate is off by 6 ms, inside its uncertainty
    skew = ClockSample(100.0, 100.504, 100.506, 100.022)
    assert skew.offset_s == pytest.approx(0.494)
    assert abs(skew.offset_s - 0.5) <= skew.uncertainty_s
    # a clock 2 s behind the head's gives a negative offset
    assert ClockSample(10.0, 8.001, 8.001, 10.002).offset_s == pytest.approx(-2.0)


def test_smallest_round_trip_is_kept() -> None:
    samples = [ClockSample(0.0, 0.510, 0.511, 0.031),   # rtt 30 ms
               ClockSample(1.0, 1.5015, 1.5016, 1.0031),  # rtt 3 ms
               ClockSample(2.0, 2.505, 2.506, 2.013),   # rtt 12 ms
               ClockSample(3.0, 3.5, 3.4, 3.001)]       # server clock went backwards: left out
    off = cluster.clock_offset("s1", samples)
    assert off.rtt_s == pytest.approx(0.003) and off.uncertainty_s == pytest.approx(0.0015)
    assert off.offset_s == pytest.approx(0.5)
    assert off.samples == 3
    assert off.to_head_s(1000.5) == pytest.approx(1000.0)
    with pytest.raises(ClusterError, match="no usable clock sample"):
        cluster.clock_offset("s1", [ClockSample(3.0, 3.5, 3.4, 3.001)])


def test_replay_refused_when_the_offset_is_too_uncertain() -> None:
    good = cluster.ClockOffset("s1", 0.5, 0.0015, 0.003, 16)
    bad = cluster.ClockOffset("s2", -0.2, 0.0025, 0.005, 16)
    cluster.check_clocks([good])
    assert cluster.MAX_CLOCK_UNCERTAINTY_S == 0.002
    with pytest.raises(ClusterError, match=r"server s2: clock offset -200.000 ms is known only to \+-2.500 ms") \
            as info:
        cluster.check_clocks([good, bad])
    assert "more than the 2 ms a replay allows" in str(info.value) and one_line(str(info.value))


def test_clock_probe_round_trips_through_the_real_echo() -> None:
    # the probe's own session code and the echo script, run locally instead of over ssh
    probe = cluster.SshClockProbe(argv_for=lambda server, argv: [sys.executable, *argv[1:]])
    samples = probe(Server("s1", "10.0.0.2", cluster.WORKER), 5)
    assert len(samples) == 5
    off = cluster.clock_offset("s1", samples)
    assert abs(off.offset_s) <= off.uncertainty_s + 1e-3  # the same clock: offset zero within the bound
    assert 0 <= off.rtt_s < 0.5
    dead = cluster.SshClockProbe(argv_for=lambda server, argv: [sys.executable, "-c", "import sys; "
                                                                "sys.stderr.write('no python3 here\\n')"])
    with pytest.raises(ClusterError, match="server s1: clock probe failed: no python3 here"):
        dead(Server("s1", "10.0.0.2", cluster.WORKER), 3)


# -- the preflight, with canned answers -------------------------------------------------------------
def test_remote_commands_are_quoted_word_by_word() -> None:
    argv = cluster.ssh_argv(Server("s1", "10.0.0.2", cluster.WORKER), ["git", "-C", "/srv/net kv; rm -rf /",
                                                                        "rev-parse", "HEAD"])
    assert argv[:2] == ["ssh", "-T"] and "BatchMode=yes" in argv and argv[-3:-1] == ["root@10.0.0.2", "--"]
    assert shlex.split(argv[-1]) == ["git", "-C", "/srv/net kv; rm -rf /", "rev-parse", "HEAD"]


OK = CommandResult(0, "", "")


class Canned:
    """Answers by (where, command): where is ``local`` or the ssh destination."""

    def __init__(self, overrides: dict[tuple[str, str], CommandResult] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.answers: dict[tuple[str, str], CommandResult] = {
            ("local", "ip -o -4 addr show"): CommandResult(0, "2: eth0    inet 10.0.0.1/24 brd 10.0.0.255\n", ""),
            ("local", f"git -C {REPO} rev-parse HEAD"): CommandResult(0, COMMIT + "\n", ""),
            ("local", "ovs-vsctl --version"): CommandResult(0, "ovs-vsctl (Open vSwitch) 3.1.0\nDB Schema 8.3.1\n", ""),
            ("local", "sudo -E true"): OK,
        }
        for addr in ("10.0.0.2", "10.0.0.3"):
            self.answers[(f"root@{addr}", "true")] = OK
            self.answers[(f"root@{addr}", "sudo -E true")] = OK
            self.answers[(f"root@{addr}", f"git -C {REPO} rev-parse HEAD")] = CommandResult(0, COMMIT + "\n", "")
            self.answers[(f"root@{addr}", "ovs-vsctl --version")] = CommandResult(
                0, "ovs-vsctl (Open vSwitch) 3.1.0\n", "")
        self.answers.update(overrides or {})

    def __call__(self, argv: Sequence[str], timeout_s: float) -> CommandResult:
        self.calls.append(list(argv))
        key = (argv[-3], argv[-1]) if argv[0] == "ssh" else ("local", " ".join(argv))
        return self.answers[key]


def steady_probe(server: Server, count: int) -> list[ClockSample]:
    return [ClockSample(10.0 + i, 10.3 + i + 0.0004, 10.3 + i + 0.0005, 10.0 + i + 0.0009) for i in range(count)]


SERVERS3 = "head=10.0.0.1,s1=10.0.0.2,s2=10.0.0.3"


def test_preflight_passes_with_everything_in_place() -> None:
    runner = Canned()
    result = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=runner, probe=steady_probe,
                                   repo_dir=REPO)
    assert result.ok and result.problem_line() == ""
    rows = result.to_json()["servers"]
    assert [r["commit"] for r in rows] == [COMMIT] * 3
    assert rows[1]["clock"]["offset_s"] == pytest.approx(0.3) and rows[1]["clock"]["uncertainty_s"] < 0.001
    assert rows[0]["ovs_version"] == "ovs-vsctl (Open vSwitch) 3.1.0"
    assert all(a[0] != "sh" and "-c" not in a[:2] for a in runner.calls)  # no shell on this side


def test_preflight_needs_servers() -> None:
    with pytest.raises(ClusterError, match="no servers given"):
        cluster.check_servers([], runner=Canned(), probe=steady_probe, repo_dir=REPO)


def test_unreachable_server_is_one_line() -> None:
    runner = Canned({("root@10.0.0.3", "true"): CommandResult(
        255, "", "ssh: connect to host 10.0.0.3 port 22: No route to host\n")})
    result = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=runner, probe=steady_probe,
                                   repo_dir=REPO)
    assert not result.ok
    assert result.problem_line() == ("s2 (10.0.0.3): unreachable by ssh as root with a key (ssh: connect to host "
                                     "10.0.0.3 port 22: No route to host)")
    assert not any(c[0] == "ssh" and c[-3] == "root@10.0.0.3" and c[-1] != "true" for c in runner.calls)


def test_different_commit_and_missing_ovs_are_named() -> None:
    other = "fedcba9876543210fedcba9876543210fedcba98"
    runner = Canned({("root@10.0.0.2", f"git -C {REPO} rev-parse HEAD"): CommandResult(0, other + "\n", ""),
                     ("root@10.0.0.3", "ovs-vsctl --version"): CommandResult(
                         127, "", "bash: ovs-vsctl: command not found\n")})
    result = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=runner, probe=steady_probe,
                                   repo_dir=REPO)
    line = result.problem_line()
    assert one_line(line)
    assert "s1 (10.0.0.2): commit fedcba987654 differs from the head's 0123456789ab" in line
    assert "s2 (10.0.0.3): Open vSwitch missing (ovs-vsctl --version: bash: ovs-vsctl: command not found)" in line


def test_head_address_must_be_this_machine_and_clock_bound_applies() -> None:
    runner = Canned({("local", "ip -o -4 addr show"): CommandResult(0, "2: eth0    inet 10.0.0.10/24\n", "")})

    def noisy(server: Server, count: int) -> list[ClockSample]:
        return [ClockSample(0.0, 0.0025, 0.0026, 0.0051)] * count  # 5 ms round trip: +-2.5 ms

    result = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=runner, probe=noisy, repo_dir=REPO)
    line = result.problem_line()
    assert line.startswith("head (10.0.0.1): 10.0.0.1 is not an address of this machine")
    assert "s1 (10.0.0.2): clock offset" in line and "more than the 2 ms a replay allows" in line
    assert one_line(line)
    # a fabric without a replay (netkv up): the offsets are measured and reported, not bounded
    fabric_only = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=Canned(), probe=noisy,
                                        repo_dir=REPO, bound_s=None)
    assert fabric_only.ok and fabric_only.servers[1].clock is not None
    assert fabric_only.servers[1].clock.uncertainty_s == pytest.approx(0.0025)
    assert fabric_only.to_json()["clock_uncertainty_bound_s"] is None


# -- netkv up --servers -------------------------------------------------------------------------------
def cluster_cfg(text: str = SERVERS3) -> TestbedConfig:
    cfg = TestbedConfig(mtu_bytes=1458, servers=cluster.servers_to_json(cluster.parse_servers(text)))
    cfg.validate()
    return cfg


def test_up_with_servers_checks_every_server_then_builds_with_that_check(capsys: pytest.CaptureFixture[str]) -> None:
    checks: list[cluster.ClusterCheck] = []
    built: list[object] = []

    def passing(servers: list[Server]) -> cluster.ClusterCheck:
        checks.append(cluster.check_servers(servers, runner=Canned(), probe=steady_probe, repo_dir=REPO))
        return checks[-1]

    def build(tb: object, args: argparse.Namespace) -> int:
        built.append(tb)
        return 0

    assert cluster_up(cluster_cfg(), argparse.Namespace(json=False), check=passing, build=build) == 0
    out = capsys.readouterr().out
    assert "8 links cross machines" in out and "s1 (10.0.0.2) worker: ok" in out
    (tb,) = built
    assert tb.server_check is checks[0] and tb.sites.cluster  # type: ignore[attr-defined]


def test_up_with_servers_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    def failing(servers: list[Server]) -> cluster.ClusterCheck:
        runner = Canned({("root@10.0.0.2", "true"): CommandResult(255, "", "Permission denied (publickey).\n")})
        return cluster.check_servers(servers, runner=runner, probe=steady_probe, repo_dir=REPO)

    with pytest.raises(PreflightError, match=r"^s1 \(10.0.0.2\): unreachable by ssh as root with a key "
                                             r"\(Permission denied \(publickey\).\)$"):
        cluster_up(cluster_cfg(), argparse.Namespace(json=False), check=failing)
    assert "links cross machines" in capsys.readouterr().out


@pytest.mark.parametrize("servers,extra,fragment", [
    ("head=10.0.0.1,s1", [], "entry 's1' is not NAME=IPV4"),
    ("head=10.0.0.1,s1=10.0.0.2,s1=10.0.0.3", [], "name 's1' is given twice"),
    ("head=10.0.0.1,s1=10.0.0.2", [], "mtu_bytes 1500 would fragment in its gretap tunnel"),
    ("head=10.0.0.1,s1=10.0.0.2", ["--mtu-bytes", "1458", "--param", "pods=4"], "placement does not fit"),
])
def test_cli_refusals_are_one_line(servers: str, extra: list[str], fragment: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "up", "--servers", servers, *extra, "--check",
                           "--json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and one_line(proc.stderr) and proc.stdout == ""


def test_a_simulation_across_servers_is_refused_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "--servers", "head=10.0.0.1,s1=10.0.0.2",
                           "--mtu-bytes", "1458", "--quiet"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "the simulator runs on this machine alone; --servers (2 servers)" in proc.stderr
    assert one_line(proc.stderr)


def test_a_server_whose_sudo_speaks_or_is_missing_is_named() -> None:
    """MCE takes any output of its tunnel and interface commands as a failure:
    the preflight names a server whose sudo warns, and one without sudo."""
    warn = CommandResult(0, "", "sudo: unable to resolve host s1: Name or service not known\n")
    runner = Canned({("root@10.0.0.2", "sudo -E true"): warn,
                     ("root@10.0.0.3", "sudo -E true"): CommandResult(127, "", "bash: sudo: command not found\n")})
    result = cluster.check_servers(cluster.parse_servers(SERVERS3), runner=runner, probe=steady_probe, repo_dir=REPO)
    line = result.problem_line()
    assert one_line(line)
    assert "s1 (10.0.0.2): sudo -E prints 'sudo: unable to resolve host s1: Name or service not known'" in line
    assert "add it to /etc/hosts" in line
    assert "s2 (10.0.0.3): sudo -E does not run (bash: sudo: command not found)" in line
