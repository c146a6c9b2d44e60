"""The vm-check's guest side (``python3 -m guests.vmcheck guest``): the
Vagrantfile's provisioner, then the checks, each step's result written to the
share as soon as it is known."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from guests.common import GUEST_REPO, last_json

# Guest check settings.
PREFIXES = {"up_check": "vu", "rate": "vr", "delay": "vd", "run": "vn", "down": "vw"}


DELAY_MS = 5.0


READY_TIMEOUT_S = 300  # software emulation: the controller and Mininet start slowly


RATE_SECONDS = 10


RUN_REQUESTS = 8


# -- guest -------------------------------------------------------------------------------
class GuestResult:
    """result.json in the share, rewritten after every step."""

    def __init__(self, share: Path) -> None:
        self.path = share / "result.json"
        self.data: dict[str, Any] = {"guest": {}, "steps": {}, "summary": {}}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def run_step(argv: Sequence[str], timeout_s: float, cwd: str = GUEST_REPO,
             log: Path | None = None) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds); a step past its time is ended
    with its whole process group.  With ``log``, the output goes to that file
    as it comes (the host can follow it in the share) and is returned as stdout."""
    t = time.monotonic()
    sink = open(log, "w") if log is not None else None
    proc = subprocess.Popen(list(argv), stdout=sink or subprocess.PIPE,
                            stderr=subprocess.STDOUT if sink else subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    rc = -9
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr = (stderr or "") + f"\n[vm-check: ended after {timeout_s:g} s]"
    finally:
        if sink is not None:
            sink.close()
    if log is not None:
        stdout = log.read_text(errors="replace")
    return rc, stdout or "", stderr or "", time.monotonic() - t


def guest_facts() -> dict[str, Any]:
    def read(path: str) -> str:
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
        return ""

    subprocess.run(["modprobe", "-q", "openvswitch"], check=False)
    ns = "vmcheckprobe"
    subprocess.run(["ip", "netns", "add", ns], check=False)
    netem = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                            "delay", "1ms"], capture_output=True).returncode == 0
    subprocess.run(["ip", "netns", "delete", ns], check=False)
    return {"kernel": os.uname().release, "openvswitch_module": Path("/sys/module/openvswitch").exists(),
            "netem": netem, "tcp_congestion": read("/proc/sys/net/ipv4/tcp_congestion_control"),
            "cpus": os.cpu_count(), "os": read("/etc/debian_version")}


def guest_main(share: Path) -> int:
    res = GuestResult(share)
    t0 = time.monotonic()
    res.data["guest"] = guest_facts()
    res.save()
    steps, summary = res.data["steps"], res.data["summary"]
    venv = Path(GUEST_REPO) / ".venv/bin"
    netkv = str(venv / "netkv")
    py = str(venv / "python")

    def record(name: str, ok: bool, seconds: float, /, **extra: Any) -> bool:
        steps[name] = {"ok": bool(ok), "s": round(seconds, 1), **extra}
        res.save()
        return ok

    def failed_detail(rc: int, stdout: str, stderr: str) -> dict[str, Any]:
        return {"exit": rc, "stderr_tail": stderr.strip().splitlines()[-8:],
                "stdout_tail": stdout.strip().splitlines()[-4:]}

    # 1. the Vagrantfile's provisioner: privileged shell, `bash /vagrant/scripts/install.sh`
    rc, stdout, stderr, s = run_step(["bash", f"{GUEST_REPO}/scripts/install.sh"], timeout_s=150 * 60, cwd="/",
                                     log=share / "install.log")
    if not record("install", rc == 0, s, exit=rc, output=stdout.strip().splitlines()[-(6 if rc == 0 else 16):]):
        res.data["total_s"] = round(time.monotonic() - t0, 1)
        res.save()
        return 1
    common = ["--topology", "tiny", "--ready-timeout-s", str(READY_TIMEOUT_S)]

    # 2. netkv up --check --json with --datapath auto: the kernel datapath must be chosen
    rc, stdout, stderr, s = run_step([netkv, "up", *common, "--datapath", "auto", "--check", "--json",
                                      "--prefix", PREFIXES["up_check"]], timeout_s=900)
    rep = last_json(stdout) or {}
    summary["datapath"] = rep.get("datapath")
    record("up_check", rc == 0 and rep.get("datapath") == "kernel" and rep.get("pings_ok") == rep.get("pings_total"),
           s, datapath=rep.get("datapath"), switch_mode=rep.get("switch_mode"), up_s=rep.get("up_s"),
           pings=f"{rep.get('pings_ok')}/{rep.get('pings_total')}", tcp_congestion=rep.get("tcp_congestion"),
           steps_s=rep.get("steps_s"), **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 3. the shaped-link rate check, and 4. the delay check (probes below, in the venv)
    for name, extra in (("rate", []), ("delay", ["--delay-ms", f"{DELAY_MS:g}"])):
        rc, stdout, stderr, s = run_step([py, "-m", "guests.vmcheck", f"probe-{name}",
                                          "--prefix", PREFIXES[name], *extra], timeout_s=900)
        probe = last_json(stdout) or {}
        if name == "rate":
            summary["rate_ratio"] = probe.get("ratio")
        else:
            summary["rtt_ms"] = probe.get("rtt_avg_ms")
            summary["rtt_expected_ms"] = probe.get("expected_rtt_ms")
        passed = bool(probe.pop("ok", False))
        record(name, rc == 0 and passed, s, **probe,
               **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 5. a short netkv run on the tiny topology: every request in has its record out
    run_out = Path("/root/vm-check-run")
    shutil.rmtree(run_out, ignore_errors=True)
    rc, stdout, stderr, s = run_step([netkv, "run", *common, "--prefix", PREFIXES["run"], "--scenario", "none",
                                      "--schedulers", "round_robin", "--max-requests", str(RUN_REQUESTS),
                                      "--duration-s", "20", "--out", str(run_out), "--quiet",
                                      # workers start ten times slower under software emulation
                                      "--set", f"startup_timeout_s={READY_TIMEOUT_S}"], timeout_s=1500)
    comparison = last_json(stdout) or {}
    m = (comparison.get("schedulers") or {}).get("round_robin") or {}
    records_path = run_out / "round_robin" / "records.jsonl"
    records_out = len(records_path.read_text().splitlines()) if records_path.is_file() else 0
    requests_in = m.get("requests_expected", m.get("requests"))
    summary["requests_in"], summary["records_out"] = requests_in, records_out
    record("run", rc == 0 and requests_in == RUN_REQUESTS and records_out == requests_in and m.get("ok") == requests_in,
           s, requests_in=requests_in, records_out=records_out, requests_ok=m.get("ok"),
           ttft_mean_ms=m.get("ttft_mean_ms"), failure_reasons=m.get("failure_reasons"),
           **({} if rc == 0 else failed_detail(rc, stdout, stderr)))

    # 6. netkv up (foreground), stopped from outside by netkv down
    t = time.monotonic()
    prefix = PREFIXES["down"]
    up_log = Path("/root/vm-check-up.log")
    with open(up_log, "w") as log:
        up = subprocess.Popen([netkv, "up", *common, "--prefix", prefix], stdout=log, stderr=subprocess.STDOUT,
                              cwd=GUEST_REPO, start_new_session=True)
    deadline = time.monotonic() + 900
    while "running;" not in up_log.read_text() and up.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    seen = up_log.read_text()
    running = "running;" in seen
    rc, stdout, stderr, _ = run_step([netkv, "down", "--prefix", prefix], timeout_s=300)
    try:
        up_rc: int | None = up.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up_rc = None
    record("down", running and rc == 0 and "nothing left" in stdout and up_rc == 0, time.monotonic() - t,
           was_running=running, down_said=stdout.strip(), up_exit=up_rc,
           up_said=seen.strip().splitlines()[-3:])

    # 7. nothing of any prefix left anywhere in the guest
    rc, stdout, stderr, s = run_step([py, "-m", "guests.vmcheck", "probe-leftovers",
                                      "--prefix", *PREFIXES.values()], timeout_s=300)
    left = last_json(stdout) or {}
    summary["leftovers_guest"] = left.get("total")
    record("leftovers", rc == 0 and left.get("total") == 0, s, **left)
    res.data["total_s"] = round(time.monotonic() - t0, 1)
    res.save()
    return 0


# -- guest probes (run with the project's venv: they import the testbed) ------------------
def _ping_stats(output: str) -> dict[str, float]:
    """min/avg/max of ping's summary line, ms."""
    match = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", output)
    if not match:
        return {}
    return {"min": float(match[1]), "avg": float(match[2]), "max": float(match[3])}


def probe_rate(prefix: str) -> dict[str, Any]:
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from fabric.system import run as trun

    tb = Testbed(TestbedConfig(topology="tiny", prefix=prefix, ready_timeout_s=READY_TIMEOUT_S))
    src, dst = "g0", "g2"
    try:
        rep = tb.up()
        configured = tb.topo.bottleneck_gbps(src, dst) * 1000 / tb.config.scale
        ping = _ping_stats(trun(tb.in_host(src, ["ping", "-n", "-q", "-c", "5", "-i", "0.2",
                                                 tb.topo.ip_of(dst)]), check=False).stdout)
        server = tb.popen(dst, ["iperf3", "-s", "-1", "-B", tb.topo.ip_of(dst)], kind="iperf3",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            out = trun(tb.in_host(src, ["iperf3", "-c", tb.topo.ip_of(dst), "-t", str(RATE_SECONDS), "-J"]),
                       timeout_s=RATE_SECONDS + 60).stdout
        finally:
            server.kill()
            server.wait()
        measured = float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e6
        ratio = measured / configured
        return {"ok": 0.90 <= ratio <= 1.05, "datapath": rep.datapath, "path": f"{src}->{dst}",
                "configured_mbps": round(configured, 3), "measured_mbps": round(measured, 3),
                "ratio": round(ratio, 3), "base_rtt_avg_ms": ping.get("avg"), "iperf_s": RATE_SECONDS}
    finally:
        tb.down()


def probe_delay(prefix: str, delay_ms: float) -> dict[str, Any]:
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from fabric.system import run as trun

    tb = Testbed(TestbedConfig(topology="tiny", prefix=prefix, link_delay_ms=delay_ms,
                               ready_timeout_s=READY_TIMEOUT_S))
    src, dst = "g0", "g2"
    try:
        rep = tb.up()
        links = len(tb.topo.path(src, dst)) - 1
        # every link delays at the egress of the end that sends: once per link each way
        expected = 2 * links * delay_ms
        out = trun(tb.in_host(src, ["ping", "-n", "-q", "-c", "10", "-i", "0.2", tb.topo.ip_of(dst)]),
                   check=False).stdout
        ping = _ping_stats(out)
        qdisc = trun(tb.in_host(src, ["tc", "qdisc", "show", "dev", tb.intf(src, 1)]), check=False).stdout
        avg, low = ping.get("avg"), ping.get("min")
        # The minimum RTT is the delay plus the least overhead: it must hold the configured
        # delay and not much more. The average also carries the emulation's scheduling
        # noise (8-18 ms over the minimum in a TCG guest), so it is reported, not bounded.
        ok = avg is not None and low is not None and expected <= low <= expected * 1.25 + 5.0
        return {"ok": ok, "datapath": rep.datapath, "path": f"{src}->{dst}", "links": links,
                "link_delay_ms": delay_ms, "expected_rtt_ms": expected, "rtt_min_ms": low, "rtt_avg_ms": avg,
                "rtt_max_ms": ping.get("max"), "netem_on_host_end": "netem" in qdisc}
    finally:
        tb.down()


def probe_leftovers(prefixes: Sequence[str]) -> dict[str, Any]:
    """What any of the prefixes left, by the testbed's own account and by a look
    at the whole guest (bridges, namespaces, veths, processes)."""
    from fabric import cleanup
    from fabric.system import run as trun

    per_prefix = {p: cleanup.leftovers(p).total for p in prefixes}
    bridges = [b for b in trun(["ovs-vsctl", "--timeout=10", "list-br"], check=False).stdout.split() if b]
    netns = [line.split()[0] for line in trun(["ip", "netns", "list"], check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0] for line in
             trun(["ip", "-o", "link", "show"], check=False).stdout.splitlines()]
    veths = [name for name in links if any(name.startswith(p) for p in prefixes)]
    procs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmd = entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "-m controller" in cmd or "/run/netkv/" in cmd or "mininet:" in cmd or "iperf3" in cmd \
                    or "workers." in cmd:
                procs.append(cmd.strip()[:120])
    total = sum(per_prefix.values()) + len(bridges) + len(netns) + len(veths) + len(procs)
    return {"total": total, "per_prefix_total": per_prefix,
            "bridges": bridges, "namespaces": netns, "veths": veths, "processes": procs,
            "ovs_system_datapath": "ovs-system" in links}
