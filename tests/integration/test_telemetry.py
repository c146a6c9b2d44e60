"""Link telemetry on a real emulated fabric (root: Mininet, Open vSwitch, os-ken, iperf3).

A known UDP rate is pushed with iperf3 from one GPU host to another; the
controller's API must report it on every hop of the installed path within 15%
within two polling intervals, idle links must read (near) zero, an overloaded
link must read its configured rate with its queue's drops visible, and the
flow's packets must be seen on the switch interfaces of the path the API
reports and on none of the equal-cost alternatives.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from bench.telemetry import hop_samples_within, iperf_result, iperf_server, iperf_udp_client, rest_get, udp_wire_factor
from fabric.net import Testbed
from tests.helpers.fabric import cross_pair, running_testbed

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


# pytest finishes every test of one interval and tears that fabric down before
# it builds the next, so only one emulation runs at a time.
@pytest.fixture(scope="module", params=[0.5, 0.1], ids=["poll-0.5s", "poll-0.1s"])
def tb(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    yield from running_testbed("t", poll_interval_s=request.param)


def wait_for_samples(tb: Testbed, min_hops: int, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = rest_get(tb.rest_url, "/status")
        if status["hops_measured"] >= min_hops:
            return status
        time.sleep(0.2)
    raise AssertionError(f"only {status.get('hops_measured')} of {min_hops} hops measured: {status}")


def test_status_shows_a_live_poller(tb: Testbed) -> None:
    status = wait_for_samples(tb, 2 * len(tb.topo.links))
    deadline = time.monotonic() + 5  # queues are read once a second
    while status["queues"]["interfaces"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = rest_get(tb.rest_url, "/status")
    poller = status["poller"]
    assert poller["alive"] and not poller["stalled"]
    assert poller["rounds"] >= 2 and poller["replies_received"] >= len(tb.topo.switches)
    # at 0.5 s a tiny idle fabric answers every round; at 0.1 s a busy machine may
    # delay a reply past the next round now and then, but not often
    allowed = 0 if tb.config.poll_interval_s >= 0.5 else 0.05 * poller["rounds"] * len(tb.topo.switches)
    assert poller["replies_missing"] <= allowed, poller
    assert status["queues"]["interfaces"] > 0, status["queues"]
    rows = rest_get(tb.rest_url, "/links")["links"]
    assert {r["clock"] for r in rows} == {"switch"}, "OVS reports port durations: intervals use the switch clock"


def test_known_rate_is_reported_on_every_hop_of_the_path(tb: Testbed) -> None:
    src, dst = cross_pair(tb, "a1")
    topo = tb.topo
    hops = topo.path_hops(src, dst)
    reverse = set(topo.path_hops(dst, src))
    bottleneck_mbps = min(tb.emulated_mbps(topo.link_between(x, y)) for x, y in hops)
    rate_mbps = 0.5 * bottleneck_mbps  # payload; well under every hop's rate
    wait_for_samples(tb, 2 * len(topo.links))
    interval_s = tb.config.poll_interval_s
    seconds = 6.0
    server = iperf_server(tb, dst, 5201)
    t_launch = time.time()
    client = iperf_udp_client(tb, src, dst, 5201, rate_mbps, seconds)
    time.sleep(seconds / 2)
    mid = rest_get(tb.rest_url, "/links")
    result = iperf_result(client)
    server.wait(timeout=10)
    t_done = time.time()
    expected_bps = result["receiver_bps"] * udp_wire_factor()
    # UDP bursts can overflow a 32-packet queue when the switch process is slow on a
    # busy machine; hops read what they carried, so a little loss stays inside 15%
    assert result["lost_fraction"] < 0.05, f"too much loss for a meaningful comparison: {result}"
    assert expected_bps == pytest.approx(rate_mbps * 1e6 * udp_wire_factor(), rel=0.07)

    for x, y in hops:
        hist = rest_get(tb.rest_url, f"/links/{x}/{y}")["history"]
        fresh = [h for h in hist if h["t_s"] >= t_launch]
        busy = [h for h in fresh if h["rate_bps"] > 0.05 * expected_bps]
        assert busy, f"{x}->{y}: no traffic seen"
        # the flow began inside the interval of the first busy sample; two
        # intervals later (plus reply jitter) a reading must be within 15%
        began = busy[0]["t_s"] - busy[0]["interval_s"]
        deadline = began + 2 * interval_s + 0.25
        early = [h for h in busy if h["t_s"] <= deadline]
        assert any(abs(h["rate_bps"] - expected_bps) <= 0.15 * expected_bps for h in early), \
            (x, y, expected_bps, [(round(h["t_s"] - began, 3), h["rate_bps"]) for h in early])
        steady = hop_samples_within(hist, began + interval_s, t_done - 1.0)
        assert len(steady) >= 4, (x, y, len(steady))
        med = statistics.median(h["rate_bps"] for h in steady)
        print(f"[{interval_s} s] {x}->{y}: expected {expected_bps / 1e6:.3f} Mbit/s; first busy sample at +"
              f"{busy[0]['t_s'] - began:.2f} s; readings within 2 intervals "
              f"{[round(h['rate_bps'] / 1e6, 3) for h in early]}; steady median {med / 1e6:.3f} "
              f"({100 * (med - expected_bps) / expected_bps:+.1f}%)")
        assert med == pytest.approx(expected_bps, rel=0.15), (x, y, med, expected_bps)
        link = topo.link_between(x, y)
        assert steady[-1]["load_gbps"] == pytest.approx(steady[-1]["rate_bps"] * tb.config.scale / 1e9)
        assert steady[-1]["capacity_gbps"] == link.rate_gbps

    # idle links read zero while the flow runs (the reverse path carries iperf3's control traffic)
    idle = [r for r in mid["links"] if (r["src"], r["dst"]) not in set(hops) | reverse]
    assert idle, "the tiny fabric has links off the flow's path"
    worst = max(idle, key=lambda r: r["utilization"])
    print(f"idle links: {len(idle)}, worst {worst['src']}->{worst['dst']} utilization {worst['utilization']:.5f}")
    assert worst["utilization"] < 0.005, worst
    on_path = {(r["src"], r["dst"]): r for r in mid["links"]}
    assert on_path[hops[2]]["rate_bps"] == pytest.approx(expected_bps, rel=0.15)
    assert mid["links"][0]["utilization"] >= on_path[hops[2]]["utilization"] - 1e-9  # busiest first


def test_overloaded_link_reads_its_rate_and_queue_drops(tb: Testbed) -> None:
    src, dst = cross_pair(tb, "a0")
    topo = tb.topo
    hops = topo.path_hops(src, dst)
    # the narrowest hop past the sender's own (shaped) interface
    narrow = min(hops[1:], key=lambda h: topo.link_between(*h).rate_gbps)
    cap_mbps = tb.emulated_mbps(topo.link_between(*narrow))
    assert narrow[0] != src and not topo.node(narrow[0]).is_gpu
    wait_for_samples(tb, 2 * len(topo.links))
    before = {(r["src"], r["dst"]): r for r in rest_get(tb.rest_url, "/links")["links"]}
    q_before = (before[narrow].get("queue") or {}).get("drops_total", 0)
    # offer 1.4x the narrow hop's rate; upstream hops must be wider to deliver it
    rate_mbps = 1.4 * cap_mbps / udp_wire_factor()
    upstream = min(tb.emulated_mbps(topo.link_between(*h)) for h in hops[: hops.index(narrow)])
    assert upstream > 1.5 * cap_mbps, "pick a topology where the overload reaches the narrow hop"
    server = iperf_server(tb, dst, 5202)
    t_launch = time.time()
    client = iperf_udp_client(tb, src, dst, 5202, rate_mbps, 5.0)
    iperf_result(client)
    server.wait(timeout=10)
    time.sleep(1.5)  # at least one queue read and one poll after the flow
    hist = rest_get(tb.rest_url, f"/links/{narrow[0]}/{narrow[1]}")["history"]
    steady = hop_samples_within(hist, t_launch + 1.5, t_launch + 4.5)
    assert steady
    med = statistics.median(h["rate_bps"] for h in steady)
    assert med == pytest.approx(cap_mbps * 1e6, rel=0.15)
    util = statistics.median(h["utilization"] for h in steady)
    print(f"overloaded {narrow}: capacity {cap_mbps:.3f} Mbit/s, offered {rate_mbps * udp_wire_factor():.3f} "
          f"wire Mbit/s, read median {med / 1e6:.3f} Mbit/s, utilization {util:.3f}")
    assert 0.85 <= util <= 1.1
    after = {(r["src"], r["dst"]): r for r in rest_get(tb.rest_url, "/links")["links"]}
    queue = after[narrow]["queue"]
    assert queue is not None and queue["interface"] == tb.intf(narrow[0], topo.port_to(*narrow))
    print(f"queue of {queue['interface']}: drops {q_before} -> {queue['drops_total']}; port-counter drops "
          f"charged to the hop {before[narrow]['drops_total']} -> {after[narrow]['drops_total']}")
    assert queue["drops_total"] > q_before, queue
    metrics = urlopen_text(tb.rest_url + "/metrics")
    assert f'netkv_queue_drops_total{{src="{narrow[0]}",dst="{narrow[1]}"' in metrics


def urlopen_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_packets_take_the_path_the_api_reports(tb: Testbed) -> None:
    src, dst = cross_pair(tb, "a1")
    path = rest_get(tb.rest_url, f"/path?src={src}&dst={dst}")
    assert path["alternatives"], "tiny has two equal-cost paths for cross-rack pairs"
    src_ip, dst_ip = path["src_ip"], path["dst_ip"]

    def switch_egress(nodes: list[str]) -> list[tuple[str, str]]:
        # every switch-to-switch hop's (switch, egress interface)
        return [(x, tb.intf(x, tb.topo.port_to(x, y))) for x, y in zip(nodes[1:-2], nodes[2:-1])]

    on_path = switch_egress(path["nodes"])
    assert [i for _, i in on_path] == [h["interface"] for h in path["hops"][1:-1]]
    off_path = sorted({i for alt in path["alternatives"] for i in switch_egress(alt)} - set(on_path))
    assert off_path
    seconds = 3.0
    # one scapy capture per interface, where the interface is (its switch's namespace)
    sniffers = {iface: subprocess.Popen(
        tb.in_switch(sw, [sys.executable, "-m", "tests.helpers.sniff", iface, src_ip, dst_ip,
                          str(seconds + 3.0)]),
        stdout=subprocess.PIPE, text=True, cwd=ROOT) for sw, iface in on_path + off_path}
    try:
        for proc in sniffers.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        server = iperf_server(tb, dst, 5203)
        client = iperf_udp_client(tb, src, dst, 5203, 1.0, seconds)
        result = iperf_result(client)
        server.wait(timeout=10)
        counts = {iface: int(proc.communicate(timeout=30)[0].strip().splitlines()[-1])
                  for iface, proc in sniffers.items()}
    finally:
        for proc in sniffers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    sent_packets = result["sender_bps"] * seconds / 8 / 1400
    print(f"packets {src_ip}->{dst_ip} per interface (sent ~{sent_packets:.0f}): {counts}")
    for _, iface in on_path:
        assert counts[iface] >= 0.9 * sent_packets, (iface, counts, sent_packets)
    for _, iface in off_path:
        assert counts[iface] == 0, (iface, counts)
