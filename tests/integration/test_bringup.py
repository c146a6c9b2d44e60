"""Bring-up of real emulated fabrics (root: Mininet, Open vSwitch, os-ken, iperf3)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from controller.routing import flow_entries, walk
from fabric import cleanup, system, verify
from fabric.config import TestbedConfig
from fabric.net import Testbed
from tests.helpers.fabric import running_testbed
from tests.helpers.net import free_port, test_prefix

pytestmark = pytest.mark.root
NETKV = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[2]


def make_config(topology: str, prefix: str | None = None, **extra: object) -> TestbedConfig:
    return TestbedConfig(topology=topology, prefix=prefix or test_prefix(), of_port=free_port(),
                         rest_port=free_port(), **extra)  # type: ignore[arg-type]


def assert_nothing_left(prefix: str) -> None:
    left = cleanup.leftovers(prefix)
    assert left.total == 0, f"teardown left {left.as_dict()}"
    own = re.compile(rf"^\d+: {prefix}[gvtac]\d+-eth\d+[@:]")
    assert not [line for line in system.run(["ip", "-o", "link"]).stdout.splitlines()
                if own.match(line)], "a veth of the testbed survived"


def check_flow_tables(tb: Testbed) -> None:
    tables = verify.flow_tables(tb)
    expected = {name: sorted(entries) for name, entries in flow_entries(tb.topo).items()}
    assert tables == expected, "flow tables on the switches differ from the computed routes"
    gpus = tb.topo.gpu_names()
    for src in gpus:
        for dst in gpus:
            if src != dst:
                assert walk(tb.topo, tables, src, dst) == tb.topo.path(src, dst)


@pytest.fixture(scope="module")
def tiny() -> Iterator[Testbed]:
    yield from running_testbed("m")
    assert_nothing_left(test_prefix("m"))


def test_tiny_all_pairs_reach_each_other(tiny: Testbed) -> None:
    gpus = tiny.topo.gpu_names()
    pairs = [(s, d) for s in gpus for d in gpus if s != d]
    results = verify.ping(tiny, pairs, count=1)
    assert all(ok for _, _, ok in results), [r for r in results if not r[2]]
    assert {tiny.topo.tier_distance(s, d) for s, d in pairs} == {0, 2}


def test_tiny_flow_tables_match_computed_paths(tiny: Testbed) -> None:
    check_flow_tables(tiny)


def test_tiny_links_are_shaped_on_both_ends(tiny: Testbed) -> None:
    link = tiny.topo.link_between("t0", "a0")
    for node in ("t0", "a0"):
        out = system.run(tiny.in_switch(node, ["tc", "class", "show", "dev", tiny.intf(node, link.port_of(node))])).stdout
        kbit = round(tiny.emulated_mbps(link) * 1000)
        assert f"rate {kbit}Kbit" in out or f"rate {kbit // 1000}Mbit" in out, out
    host_if = tiny.intf("g0", 1)
    out = system.run(tiny.in_host("g0", ["tc", "class", "show", "dev", host_if])).stdout
    assert "htb" in out
    sysctl = system.run(tiny.in_host("g0", ["sysctl", "-n", "net.ipv4.tcp_slow_start_after_idle"])).stdout
    assert sysctl.strip() == "0"


def iperf_mbps(tb: Testbed, src: str, dst: str, seconds: int = 5) -> float:
    server = tb.popen(dst, ["iperf3", "-s", "-1", "-B", tb.topo.ip_of(dst)], kind="iperf3",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        out = system.run(tb.in_host(src, ["iperf3", "-c", tb.topo.ip_of(dst), "-t", str(seconds), "-J"]),
                         timeout_s=seconds + 20).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        server.kill()
        server.wait()


def test_rate_limited_link_reaches_its_configured_rate(tiny: Testbed) -> None:
    # g0 -> g2 crosses ToR-aggregation links, the bottleneck of the path.
    bottleneck_mbps = tiny.topo.bottleneck_gbps("g0", "g2") * 1000 / tiny.config.scale
    measured = iperf_mbps(tiny, "g0", "g2")
    if measured < 0.90 * bottleneck_mbps:
        # One switch process forwards every bridge of the machine: another
        # emulation's traffic at the same moment slows this one.  Measure once more.
        measured = max(measured, iperf_mbps(tiny, "g0", "g2"))
    assert 0.90 * bottleneck_mbps <= measured <= 1.05 * bottleneck_mbps, (measured, bottleneck_mbps)


def test_second_instance_with_same_prefix_is_refused(tiny: Testbed) -> None:
    proc = subprocess.run(NETKV + ["up", "--topology", "tiny", "--prefix", tiny.prefix, "--check",
                                   "--of-port", str(free_port()), "--rest-port", str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "already up" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not tiny.dead_switches() and tiny.rest_get("/status")["ready"], \
        "the refused attempt removed the running instance"


@pytest.mark.parametrize("mode", ["per_switch", "shared"])
def test_default_fattree_up_verify_routes_teardown(mode: str) -> None:
    cfg = make_config("fattree", switch_mode=mode)
    tb = Testbed(cfg)
    try:
        report = tb.up()
        assert report.gpus == 64 and report.switches == 18 and report.links == 88
        assert report.switch_mode == mode
        assert report.switch_processes == (18 if mode == "per_switch" else 0)
        assert report.pings_ok == report.pings_total == 128
        assert set(report.pings_by_tier) == {0, 3}
        # every tier distance, explicitly
        pairs = [("g0", "g1"), ("g0", "g9"), ("g0", "g17"), ("g0", "g33"), ("g63", "g2"), ("g40", "g47")]
        assert all(ok for _, _, ok in verify.ping(tb, pairs)), "a pair at some tier distance is unreachable"
        assert {tb.topo.tier_distance(s, d) for s, d in pairs} == {0, 1, 2, 3}
        check_flow_tables(tb)
        print(f"{mode}: up {report.up_s:.1f} s, verify {report.verify_s:.1f} s, steps {report.steps_s}")
    finally:
        t0 = time.monotonic()
        tb.down()
        print(f"{mode}: down {time.monotonic() - t0:.1f} s")
    assert_nothing_left(cfg.prefix)


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_per_switch_instances_are_isolated(tiny: Testbed) -> None:
    assert tiny.report.switch_mode == "per_switch" and tiny.per_switch
    pids = tiny.switch_processes()
    assert sorted(pids) == sorted(sw.name for sw in tiny.topo.switches)
    # one process per switch, each in a namespace of its own (not the root one)
    spaces = {netns_inode(pid) for pid in pids.values()}
    assert len(spaces) == len(pids) and netns_inode(os.getpid()) not in spaces
    for name, pid in pids.items():
        ports = set(system.run(tiny.in_switch(name, ["ls", "/sys/class/net"])).stdout.split())
        own = {tiny.intf(name, link.port_of(name)) for link in tiny.topo.links if name in (link.a, link.b)}
        assert own <= ports, (name, own, ports)
        assert not [p for p in ports if p.startswith(tiny.prefix) and p not in own and p != tiny.mn_name(name)]
        # the process serves only its own bridge's ports (plus the bridge's internal port)
        shown = tiny.appctl(name, "dpif/show")
        assert f"{tiny.mn_name(name)}:" in shown and len([l for l in shown.splitlines() if "eth" in l]) == len(own)
    # switches reach the controller over the Unix socket: nothing listens beyond loopback
    listeners = system.run(["ss", "-Hltnp"]).stdout.splitlines()
    for line in listeners:
        if any(f"pid={pid}," in line for pid in pids.values()):
            raise AssertionError(f"a switch process listens on TCP: {line}")
    status = tiny.rest_get("/status")
    assert status["switches_connected"] == status["switches_ready"] == len(pids)


def test_killed_switch_process_is_detected_and_reported() -> None:
    cfg = make_config("tiny", prefix=test_prefix("k"))
    tb = Testbed(cfg)
    try:
        tb.up()
        victim = "t1"
        os.kill(tb.switch_pids[victim], signal.SIGKILL)
        assert system.wait_until(lambda: tb.dead_switches() == [victim], timeout_s=10)
        out = run_cli("status", "--prefix", cfg.prefix, "--json")
        status = json.loads(out.stdout)
        assert out.returncode != 0 and status["switch_processes_dead"] == [victim] and status["up"] is False
        # the controller sees the connection go
        assert system.wait_until(lambda: (tb.rest_get("/status") or {}).get("switches_connected") == 5,
                                 timeout_s=20), tb.rest_get("/status")
        human = run_cli("status", "--prefix", cfg.prefix)
        assert f"1 of 6 GONE: {victim}" in human.stdout, human.stdout
    finally:
        tb.down()
    assert_nothing_left(cfg.prefix)


def test_shared_mode_reaches_routes_shapes_and_tears_down() -> None:
    cfg = make_config("tiny", prefix=test_prefix("s"), switch_mode="shared")
    tb = Testbed(cfg)
    try:
        report = tb.up()
        assert report.switch_mode == "shared" and not tb.per_switch
        assert set(cleanup.our_bridges(cfg.prefix)) == {tb.mn_name(sw.name) for sw in tb.topo.switches}
        check_flow_tables(tb)
        bottleneck_mbps = tb.topo.bottleneck_gbps("g0", "g2") * 1000 / cfg.scale
        measured = iperf_mbps(tb, "g0", "g2")
        assert 0.90 * bottleneck_mbps <= measured <= 1.05 * bottleneck_mbps, (measured, bottleneck_mbps)
    finally:
        tb.down()
    assert_nothing_left(cfg.prefix)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(NETKV + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args,fragment", [
    (["up", "--topology", "tiny", "--param", "podz=2"], "unknown parameter 'podz'"),
    (["up", "--topology", "fattree", "--param", "pods=2", "--param", "cores=0"], "needs cores >= 1"),
    (["up", "--topology", "clos"], "unknown topology 'clos'"),
    (["up", "--topology", "tiny", "--datapath", "fast"], "datapath must be one of"),
    (["up", "--topology", "tiny", "--scale", "0"], "scale must be >= 1"),
    (["up", "--topology", "tiny", "--config", "/nonexistent/testbed.json"], "cannot read testbed configuration"),
])
def test_bad_input_one_line_no_network(args: list[str], fragment: str) -> None:
    prefix = test_prefix()
    proc = run_cli(*args, "--prefix", prefix)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in proc.stderr
    assert cleanup.leftovers(prefix).total == 0


def test_kernel_datapath_request_is_refused_or_used() -> None:
    cfg = make_config("tiny", datapath="kernel")
    if system.kernel_datapath_available():
        tb = Testbed(cfg)
        try:
            assert tb.up().datapath == "kernel"
        finally:
            tb.down()
    else:
        proc = run_cli("up", "--topology", "tiny", "--datapath", "kernel", "--prefix", cfg.prefix,
                       "--check")
        assert proc.returncode == 2 and "kernel datapath is not available" in proc.stderr
    assert_nothing_left(cfg.prefix)


def test_not_root_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           *NETKV, "up", "--topology", "tiny", "--prefix", test_prefix(), "--check"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "HOME": str(tmp_path), "NETKV_STATE_ROOT": str(tmp_path)})
    assert proc.returncode == 2 and "needs root" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("how", ["interrupt", "crash"])
def test_interrupted_or_crashed_run_leaves_nothing(how: str) -> None:
    prefix = test_prefix()
    proc = subprocess.Popen(NETKV + ["up", "--topology", "tiny", "--prefix", prefix,
                                     "--of-port", str(free_port()), "--rest-port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    seen = ""
    while "running;" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stdout.readline()
    assert "running;" in seen, seen + (proc.stderr.read() if proc.stderr and proc.poll() is not None else "")
    assert cleanup.leftovers(prefix).total
    if how == "interrupt":
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    else:
        proc.kill()  # no chance to clean up: the sweep must find everything
        proc.wait(timeout=30)
        assert cleanup.leftovers(prefix).total > 0
        out = run_cli("clean", "--prefix", prefix)
        assert out.returncode == 0, out.stdout + out.stderr
    assert_nothing_left(prefix)


def test_link_delay_needs_netem() -> None:
    cfg = make_config("tiny", link_delay_ms=2.0)
    if system.netem_available(cfg.prefix):
        tb = Testbed(cfg)
        try:
            tb.up()
            out = system.run(tb.in_host("g0", ["ping", "-n", "-c", "3", "-i", "0.2", tb.topo.ip_of("g2")])).stdout
            rtt_ms = float(out.strip().splitlines()[-1].split("=")[1].split("/")[1])
            # g0 -> g2 crosses 6 links, each end delays 2 ms: at least 2 x 6 x 2 ms round trip
            assert rtt_ms >= 24.0, out
        finally:
            tb.down()
    else:
        proc = run_cli("up", "--topology", "tiny", "--link-delay-ms", "2", "--prefix", cfg.prefix, "--check")
        assert proc.returncode == 2 and "needs the netem qdisc" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert_nothing_left(cfg.prefix)
