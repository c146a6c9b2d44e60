"""Telemetry benchmark: controller cost, telemetry freshness, rate accuracy.

``python -m bench.telemetry`` (root) brings up the default 64-GPU fat-tree
twice, once with the controller polling every 0.1 s and once every 1 s.  For
each it measures, with a known UDP iperf3 flow crossing the core:

* ``controller_cpu_pct``: CPU time (user + system, from /proc) the controller
  process used while the flow ran and nobody read the API, as a percentage of
  one core (``controller_cpu_idle_pct``: without traffic;
  ``controller_cpu_with_api_reads_pct``: while ``/links`` was read 4-20 times a
  second for the age figures);
* ``telemetry_age_ms_p50`` (and p95): the age of each link's latest sample
  when ``/links`` is read at random moments (what a scheduler reading the API
  sees);
* ``rate_error_pct``: |controller's rate for a loaded hop - the rate iperf3's
  receiver measured (converted to wire bits)| / that rate, median over the
  samples that fall entirely inside the flow, for the first hop past the
  sending server.

The last stdout line is one JSON object with the figures.  The helpers here
(iperf3 and TCP transfers inside host namespaces, argv lists only) are shared
with the integration tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from controller.client import ControllerClient

ETH_IP_UDP_HEADER_BYTES = 14 + 20 + 8
ETH_IP_TCP_HEADER_BYTES = 14 + 20 + 32  # with the timestamp option
UDP_PAYLOAD_BYTES = 1400


def rest_get(base_url: str, path: str, timeout_s: float = 5.0) -> Any:
    return ControllerClient(base_url).request(path, timeout_s=timeout_s)


def udp_wire_factor(payload_bytes: int = UDP_PAYLOAD_BYTES) -> float:
    """Ethernet frame bits per UDP payload bit (what port counters see per iperf3 bit)."""
    return (payload_bytes + ETH_IP_UDP_HEADER_BYTES) / payload_bytes


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc/<pid>/stat)."""
    from fabric.system import cpu_ticks

    ticks = cpu_ticks(pid)
    if ticks is None:
        raise RuntimeError(f"process {pid} is gone: no CPU time to read")
    return ticks / os.sysconf("SC_CLK_TCK")


def iperf_server(tb: Any, host: str, port: int) -> subprocess.Popen[bytes]:
    proc = tb.popen(host, ["iperf3", "-s", "-1", "-p", str(port), "-B", tb.topo.ip_of(host)], kind="bench",
                    marker="iperf3",
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it bind before the client connects
    return proc


def iperf_udp_client(tb: Any, src: str, dst: str, port: int, rate_mbps: float, seconds: float,
                     payload_bytes: int = UDP_PAYLOAD_BYTES) -> subprocess.Popen[bytes]:
    """A UDP iperf3 client sending ``rate_mbps`` of payload for ``seconds`` (JSON on stdout)."""
    if not rate_mbps > 0:
        raise ValueError(f"rate_mbps must be > 0, got {rate_mbps}")
    argv = ["iperf3", "-c", tb.topo.ip_of(dst), "-p", str(port), "-u", "-b", f"{rate_mbps * 1e6:.0f}",
            "-l", str(payload_bytes), "-t", f"{seconds:g}", "-J"]
    return tb.popen(src, argv, kind="bench", marker="iperf3", stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def iperf_result(proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> dict[str, float]:
    """Receiver-side figures of a finished iperf3 client: payload bit/s, lost fraction."""
    out, err = proc.communicate(timeout=timeout_s)
    try:
        data = json.loads(out)
    except ValueError:
        raise RuntimeError(f"iperf3 printed no JSON (rc {proc.returncode}): {err.decode()[:300]}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3 failed: {data['error']}")
    end = data["end"]
    summ = end.get("sum_received") or end["sum"]
    sent = end.get("sum_sent") or end["sum"]
    return {"receiver_bps": float(summ["bits_per_second"]), "sender_bps": float(sent["bits_per_second"]),
            "seconds": float(summ["seconds"]), "lost_fraction": float(end["sum"].get("lost_percent", 0.0)) / 100,
            "start_s": float(data["start"]["timestamp"]["timesecs"])}


RECEIVER = r"""
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(1)
print("ready", flush=True)
conn, _ = srv.accept()
total = 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    total += len(chunk)
conn.sendall(str(total).encode()); conn.close()
print(total, flush=True)
"""

SENDER = r"""
import socket, sys, time
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = b"\0" * (1 << 16)
t0 = time.monotonic()
s = socket.create_connection((host, port))
left = size
while left > 0:
    n = s.send(buf[:min(left, len(buf))])
    left -= n
s.shutdown(socket.SHUT_WR)
ack = b""
while True:
    chunk = s.recv(64)
    if not chunk:
        break
    ack += chunk
t1 = time.monotonic()
print(f"{t1 - t0:.6f} {ack.decode()}", flush=True)
"""


def tcp_transfer_s(tb: Any, src: str, dst: str, nbytes: int, port: int, timeout_s: float = 120.0) -> float:
    """Seconds from connect to the receiver's acknowledgement of all ``nbytes``
    (emulated bytes) over one new TCP connection from ``src`` to ``dst``."""
    if nbytes <= 0:
        raise ValueError(f"nbytes must be > 0, got {nbytes}")
    recv = tb.popen(dst, [sys.executable, "-c", RECEIVER, tb.topo.ip_of(dst), str(port)], kind="bench",
                    marker="python",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert recv.stdout is not None
        line = recv.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"receiver in {dst} did not start: {recv.stderr.read().decode()[:300] if recv.stderr else ''}")
        send = tb.popen(src, [sys.executable, "-c", SENDER, tb.topo.ip_of(dst), str(port), str(nbytes)],
                        kind="bench", marker="python", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = send.communicate(timeout=timeout_s)
        if send.returncode != 0:
            raise RuntimeError(f"sender in {src} failed: {err.decode()[:300]}")
        seconds, acked = out.decode().split()
        if int(acked) != nbytes:
            raise RuntimeError(f"receiver got {acked} of {nbytes} bytes")
        return float(seconds)
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait(timeout=10)


def hop_samples_within(history: list[dict[str, Any]], start_s: float, end_s: float) -> list[dict[str, Any]]:
    """Samples whose whole interval lies inside [start_s, end_s]."""
    return [h for h in history if h["t_s"] - h["interval_s"] >= start_s and h["t_s"] <= end_s]


# -- the benchmark -------------------------------------------------------------------
def measure(poll_interval_s: float, *, prefix: str, scale: float, seconds: float, of_port: int,
            rest_port: int) -> dict[str, Any]:
    from fabric.config import TestbedConfig
    from fabric.net import Testbed

    cfg = TestbedConfig(topology="fattree", params={}, scale=scale, prefix=prefix, of_port=of_port,
                        rest_port=rest_port, poll_interval_s=poll_interval_s)
    with Testbed(cfg) as tb:
        topo = tb.topo
        assert tb.controller is not None
        ctl_pid = tb.controller.pid
        gpus = topo.gpu_names()
        # a pair across the core: every tier is crossed
        src = gpus[0]
        dst = next(g for g in reversed(gpus) if topo.tier_distance(src, g) == 3)
        hops = topo.path_hops(src, dst)
        measured_hop = hops[1]  # server switch -> ToR: the first hop past the sender's own server
        bottleneck_mbps = min(tb.emulated_mbps(topo.link_between(x, y)) for x, y in hops)
        rate_mbps = 0.5 * bottleneck_mbps / udp_wire_factor()
        # idle controller cost first: no traffic
        time.sleep(2 * poll_interval_s + 1)
        c0, w0 = proc_cpu_s(ctl_pid), time.monotonic()
        time.sleep(seconds)
        idle_cpu = 100 * (proc_cpu_s(ctl_pid) - c0) / (time.monotonic() - w0)
        # loaded: one UDP flow across the core
        server = iperf_server(tb, dst, 5301)
        client = iperf_udp_client(tb, src, dst, 5301, rate_mbps, seconds + 2)
        t_start = time.time()
        time.sleep(1.0)
        # polling cost under traffic, nobody reading the API
        half = seconds / 2
        c0, w0 = proc_cpu_s(ctl_pid), time.monotonic()
        time.sleep(half)
        cpu = 100 * (proc_cpu_s(ctl_pid) - c0) / (time.monotonic() - w0)
        # freshness as an API reader sees it (reading /links costs CPU too: reported apart)
        c0, w0 = proc_cpu_s(ctl_pid), time.monotonic()
        ages: list[float] = []
        reads = 0
        deadline = time.monotonic() + half
        while time.monotonic() < deadline:
            time.sleep(random.uniform(0.05, 0.25))
            links = rest_get(tb.rest_url, "/links")["links"]
            ages.extend(float(r["age_ms"]) for r in links)
            reads += 1
        cpu_reading = 100 * (proc_cpu_s(ctl_pid) - c0) / (time.monotonic() - w0)
        result = iperf_result(client)
        server.wait(timeout=10)
        t_end = t_start + seconds + 2
        hist = rest_get(tb.rest_url, f"/links/{measured_hop[0]}/{measured_hop[1]}")["history"]
        inside = hop_samples_within(hist, t_start + 1.0, t_end - 0.5)
        expected_bps = result["receiver_bps"] * udp_wire_factor()
        errors = [abs(h["rate_bps"] - expected_bps) / expected_bps * 100 for h in inside]
        # the same samples with the interval taken from controller receive times
        errors_ctl = [abs(h["rate_bps"] * h["interval_s"] / h["controller_interval_s"] - expected_bps)
                      / expected_bps * 100 for h in inside if h["controller_interval_s"] > 0]
        status = rest_get(tb.rest_url, "/status")
        ages.sort()
        return {
            "poll_interval_s": poll_interval_s,
            "controller_cpu_pct": round(cpu, 2),
            "controller_cpu_idle_pct": round(idle_cpu, 2),
            "controller_cpu_with_api_reads_pct": round(cpu_reading, 2),
            "api_reads": reads,
            "telemetry_age_ms_p50": round(statistics.median(ages), 1) if ages else None,
            "telemetry_age_ms_p95": round(ages[int(0.95 * (len(ages) - 1))], 1) if ages else None,
            "rate_error_pct": round(statistics.median(errors), 2) if errors else None,
            "rate_error_pct_p95": round(sorted(errors)[int(0.95 * (len(errors) - 1))], 2) if errors else None,
            "rate_error_pct_max": round(max(errors), 2) if errors else None,
            "rate_samples": len(errors),
            "rate_clock": sorted({h["clock"] for h in inside}),
            "rate_error_pct_controller_clock": round(statistics.median(errors_ctl), 2) if errors_ctl else None,
            "rate_error_pct_controller_clock_max": round(max(errors_ctl), 2) if errors_ctl else None,
            "iperf_receiver_mbps": round(result["receiver_bps"] / 1e6, 3),
            "expected_wire_mbps": round(expected_bps / 1e6, 3),
            "measured_hop": f"{measured_hop[0]}->{measured_hop[1]}",
            "flow": f"{src}->{dst}",
            "replies_missing": status["poller"]["replies_missing"],
            "rounds": status["poller"]["rounds"],
            "reply_latency_ms_p50": status["poller"]["reply_latency_ms_p50"],
            "hops_measured": status["hops_measured"],
            "hops_total": status["hops_total"],
        }


def main(argv: list[str] | None = None) -> int:
    from netkv.serving.config import DEFAULT_SCALE

    ap = argparse.ArgumentParser(prog="python -m bench.telemetry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--intervals-s", type=float, nargs="+", default=[0.1, 1.0],
                    help="polling intervals to measure (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window per interval (default %(default)s)")
    ap.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                    help="testbed scale factor (default %(default)s, the testbed's)")
    ap.add_argument("--prefix", default=os.environ.get("NETKV_TEST_PREFIX", "nb"),
                    help="testbed name prefix (default $NETKV_TEST_PREFIX or nb)")
    ap.add_argument("--of-port", type=int, default=16653)
    ap.add_argument("--rest-port", type=int, default=18080)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.telemetry: needs root (Mininet, Open vSwitch)", file=sys.stderr)
        return 2
    if not 2 <= args.seconds <= 600:
        print(f"bench.telemetry: --seconds must be 2..600, got {args.seconds}", file=sys.stderr)
        return 2
    runs = []
    for interval in args.intervals_s:
        run = measure(interval, prefix=args.prefix, scale=args.scale, seconds=args.seconds,
                      of_port=args.of_port, rest_port=args.rest_port)
        print(json.dumps(run), flush=True)
        runs.append(run)
    summary: dict[str, Any] = {"topology": "fattree", "scale": args.scale, "seconds": args.seconds, "runs": runs}
    for run in runs:
        tag = f"{run['poll_interval_s']:g}s"
        summary[f"controller_cpu_pct_at_{tag}"] = run["controller_cpu_pct"]
        summary[f"telemetry_age_ms_p50_at_{tag}"] = run["telemetry_age_ms_p50"]
        summary[f"rate_error_pct_at_{tag}"] = run["rate_error_pct"]
    summary["controller_cpu_pct"] = {f"{r['poll_interval_s']:g}s": r["controller_cpu_pct"] for r in runs}
    summary["telemetry_age_ms_p50"] = {f"{r['poll_interval_s']:g}s": r["telemetry_age_ms_p50"] for r in runs}
    errs = [r["rate_error_pct"] for r in runs if r["rate_error_pct"] is not None]
    summary["rate_error_pct"] = max(errs) if errs else None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
