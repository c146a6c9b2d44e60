"""``scripts/cluster-check``: the testbed across two servers, for real, in two
qemu guests with kernels of their own (docs/design.md, "Past one machine").

host (``python3 -m guests.clustercheck``, standard library only, root):
  1. the guest image ``scripts/vm-check`` builds (cached), and a provisioned
     disk: a qcow2 overlay on it in which ``scripts/install.sh`` has run
     (``--base FILE``: e.g. the disk ``scripts/vm-check --overlay FILE`` kept;
     made here by a one-guest install run when FILE does not exist);
  2. two throw-away overlays on that disk, one share each (the job, a git
     bundle of this repository's HEAD, so both guests hold the same commit,
     and an ssh key made for the run: the head's private key, both guests'
     authorised key);
  3. two ``qemu-system-x86_64`` (KVM where the probe boots, else software
     emulation), each with qemu's user-mode network (the package registries)
     and a second NIC on a qemu socket network of their own, the management
     network (the host end listens on 127.0.0.1 only): head 192.168.77.1,
     worker 192.168.77.2;
  4. waits for the head guest to finish its steps and power off, tells the
     worker to power off, prints one JSON object, removes the overlays, the
     shares and every process it started.

guest (``python3 -m guests.clustercheck guest --share DIR``): the repository
from the bundle, ``scripts/install.sh``; the worker then waits; the head,
once the worker answers ssh, runs in its venv: ``netkv up --servers ... --check
--json`` (the preflight over ssh, the bring-up through Mininet Cluster
Edition, reachability, teardown), then a probe on a fabric of its own
(``probe``): every GPU pair pinged, an iperf3 flow across the tunnels and one
inside the worker against their shaped rates, the clock offset, ``netkv
down`` through the testbed and nothing left on either guest; then a short
``netkv run --servers`` (its workers on the worker guest, the frontend on
the head; ``run-facts`` reads what it left: requests in and records out,
transfers that crossed guests and their idle-path ratios, the clocks, each
server's envelope), the same replay on the head alone (transfers of the
same tiers crossing no machine), and one across both in which a decode worker
on the worker guest is killed and restarted while a background flow crosses
the tunnels; then ``netkv clean --servers`` with nothing
to remove.  Each step's result goes to
``result.json`` in the head's share as soon as it is known.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guests.common import GUEST_REPO, GUEST_SHARE, VmCheckError, last_json, run, tail
from guests.image import DEFAULT_CACHE, cached_image
from guests.qemu import Qemu, choose_accel, ensure_host_tools, guest_argv, share_host_cas
from lab.rundir import read_json
from netkv.repo import REPO_ROOT

HEAD_ADDR, WORKER_ADDR = "192.168.77.1", "192.168.77.2"
SERVERS = f"head={HEAD_ADDR},w1={WORKER_ADDR}"
# The fabric split across the two guests: two pods of one rack, one server of
# two GPUs each, one aggregation switch per pod and one core switch: the pods
# go to the worker, the core to the head, so the two aggregation-to-core links
# are gretap tunnels and every path between the pods crosses machines twice.
TOPOLOGY = ["--topology", "fattree", "--param", "pods=2", "--param", "racks_per_pod=1", "--param",
            "servers_per_rack=1", "--param", "gpus_per_server=2", "--param", "aggs_per_pod=1", "--param", "cores=1"]
MTU_BYTES = 1450  # below the 1,458 bytes a 1,500-byte management network carries in a keyed gretap
# Real bit/s per emulated bit/s: ten times the default, so that a guest of one
# software-emulated vCPU forwards the rates through its userspace switches
# (core links 0.5 Mbit/s, GPU links 4 Mbit/s; the first run at the default
# 1:40,000 left the worker's vCPU saturated and the flows at 11-76%).
SCALE = 400000.0
READY_TIMEOUT_S = 600
RATE_SECONDS = 20
RATE_OMIT_S = 3  # TCP's start is left out of the rate (iperf3 -O): the shaped rate is a steady state
# The replay across both guests: the trace's first requests, two schedulers.
RUN_SCHEDULERS = "round_robin,netkv"
RUN_REQUESTS = 24
# Its clock bound: the default 2 ms is below one full frame's time at the slowest link of the
# default fabric (1,514 bytes at 5 Mbit/s: 2.4 ms); at this check's scale the slowest links, the
# core's, run at 0.5 Mbit/s and one frame (1,464 bytes at MTU 1,450) takes 23.4 ms: 20 ms is
# below it as 2 ms is below 2.4.  (The first run with the default was refused: over ssh between
# two software-emulated guests with the fabric up, the best of 16 round trips took 6.6 ms.)
RUN_CLOCK_BOUND_MS = 20.0
# A decode worker on the worker guest killed 1 s into the replay (its requests fail) and
# restarted 1.5 s later (the 24 requests arrive over the first 3 s), with a background TCP flow
# across both tunnels (g0 -> g2) at half the core links' rate from 2 s after the flows' start
# (before the replay's first arrival: the workers take longer to start on these guests).
KILL_SCENARIO = {"name": "cluster-kill",
                 "description": "a decode worker on another server killed and restarted, a flow across the tunnels",
                 "flows": [{"src": "g0", "dst": "g2", "start_s": 2, "duration_s": 3600, "rate_gbps": 100,
                            "protocol": "tcp"}],
                 "events": [{"kind": "worker_kill", "t_s": 1.0, "host": "g3", "restart_after_s": 1.5}]}


def say(text: str) -> None:
    print(f"cluster-check: {text}", file=sys.stderr, flush=True)


# -- host ------------------------------------------------------------------------------
def job_sh(role: str, address: str) -> str:
    return f"""#!/bin/bash
# Written by scripts/cluster-check on the host; runs inside the guest as root.
set -u
echo "job: {role} started $(date -u +%FT%TZ) on $(uname -r)"
ip link set dev eth1 up
ip addr add {address}/24 dev eth1
echo {role} > /etc/hostname; hostname {role}
printf '127.0.0.1 localhost\n127.0.1.1 {role}\n' > /etc/hosts  # sudo resolves its own host name
mkdir -p /root/.ssh && chmod 700 /root/.ssh
cp {GUEST_SHARE}/id.pub /root/.ssh/authorized_keys && chmod 600 /root/.ssh/authorized_keys
if [ -f {GUEST_SHARE}/id ]; then cp {GUEST_SHARE}/id /root/.ssh/id_ed25519 && chmod 600 /root/.ssh/id_ed25519; fi
systemctl start ssh || echo "job: sshd did not start"
if ls {GUEST_SHARE}/ca/*.crt >/dev/null 2>&1; then
    cp {GUEST_SHARE}/ca/*.crt /usr/local/share/ca-certificates/
    update-ca-certificates >/dev/null 2>&1 || true
    printf '[global]\\ncert = /etc/ssl/certs/ca-certificates.crt\\n' >/etc/pip.conf
fi
# the repository at the bundle's commit, keeping the provisioned .venv
mkdir -p {GUEST_REPO}
find {GUEST_REPO} -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {{}} +
rm -rf /tmp/netkv-clone && git clone -q {GUEST_SHARE}/repo.bundle /tmp/netkv-clone
cp -a /tmp/netkv-clone/. {GUEST_REPO}/ && rm -rf /tmp/netkv-clone
cd {GUEST_REPO}
exec /usr/bin/python3 -m guests.clustercheck guest --share {GUEST_SHARE} --role {role}
"""


def host_main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    if os.geteuid() != 0:
        raise VmCheckError("run as root (qemu, the image cache): sudo scripts/cluster-check")
    out: dict[str, Any] = {"ok": False, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    commit = run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]).stdout.strip()
    out["repo"] = {"commit": commit, "uncommitted_changes_not_in_guests": bool(
        run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"]).stdout.strip())}
    ensure_host_tools()
    cache = Path(args.cache_dir)
    image, info, _ = cached_image(cache, False)
    base = Path(args.base).resolve()
    if not base.exists():
        raise VmCheckError(f"no provisioned disk {base}: make one with `scripts/vm-check --overlay {base}` "
                           f"(it installs the testbed in a guest and keeps the disk)")
    backing = json.loads(run(["qemu-img", "info", "--output=json", str(base)]).stdout)
    if backing.get("backing-filename") != str(image / "rootfs.raw"):
        raise VmCheckError(f"{base} is not an overlay of the current image {image}; make it again")
    out["image"] = {"key": info["key"], "kernel": info["kernel"], "base": str(base)}
    work = Path(tempfile.mkdtemp(prefix="netkv-cluster-", dir=args.work_parent))
    guests: dict[str, Qemu] = {}
    shares = {role: work / role for role in ("head", "worker")}
    try:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "netkv-cluster-check", "-f", str(work / "id")])
        run(["git", "-C", str(REPO_ROOT), "bundle", "create", str(work / "repo.bundle"), "HEAD"])
        for role, share in shares.items():
            share.mkdir()
            shutil.copy2(work / "repo.bundle", share / "repo.bundle")
            shutil.copy2(work / "id.pub", share / "id.pub")
            if role == "head":
                shutil.copy2(work / "id", share / "id")
            (share / "job.sh").write_text(job_sh(role, HEAD_ADDR if role == "head" else WORKER_ADDR))
            share_host_cas(share)
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(work / f"{role}.qcow2")])
        accel = choose_accel(args.accel, image / "vmlinuz", work, out)
        with socket.socket() as s:  # a free loopback port for the management network's host end
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t_boot = time.monotonic()
        for i, role in enumerate(("head", "worker")):
            pidfile, console = work / f"{role}.pid", work / f"{role}-console.log"
            mgmt = (f"socket,id=m0,listen=127.0.0.1:{port}" if role == "head"
                    else f"socket,id=m0,connect=127.0.0.1:{port}")
            argv = guest_argv(accel, args.cpus, args.memory_mb, image, work / f"{role}.qcow2", shares[role], pidfile,
                              console, ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
                                        "-netdev", mgmt, "-device",
                                        f"virtio-net-pci,netdev=m0,mac=52:54:00:77:00:0{i + 1}"])
            say(f"booting the {role} guest ({accel}, {args.cpus} vCPUs, {args.memory_mb} MiB); console: {console}")
            guests[role] = Qemu(argv, pidfile, str(work / f"{role}.qcow2"))
            time.sleep(2.0)  # the listening end first
        deadline = t_boot + args.timeout_min * 60
        seen: set[str] = set()
        told = False
        while guests["head"].running() and time.monotonic() < deadline:
            time.sleep(5)
            if not told and (shares["worker"] / "ready").exists():
                (shares["head"] / "worker-ready").write_text("1\n")
                out["worker_ready_s"] = round(time.monotonic() - t_boot, 1)
                say(f"worker ready after {out['worker_ready_s']} s")
                told = True
            now = read_json(shares["head"] / "result.json") or {}
            for name, step in (now.get("steps") or {}).items():
                if name not in seen and isinstance(step, dict) and "ok" in step:
                    seen.add(name)
                    say(f"{name}: {'ok' if step['ok'] else 'FAILED'} in {step.get('s')} s")
        out["timed_out"] = guests["head"].running()
        (shares["worker"] / "stop").write_text("1\n")
        stop_by = time.monotonic() + 120
        while guests["worker"].running() and time.monotonic() < stop_by:
            time.sleep(2)
        for q in guests.values():
            q.stop()
        out["vm_s"] = round(time.monotonic() - t_boot, 1)
        res = read_json(shares["head"] / "result.json") or {}
        out["steps"] = res.get("steps", {})
        out["summary"] = res.get("summary", {})
        out["worker"] = read_json(shares["worker"] / "result.json")
        names = ("install", "up_check", "probe", "run", "clean")
        out["steps_passed"] = [n for n in names if (out["steps"].get(n) or {}).get("ok")]
        out["ok"] = len(out["steps_passed"]) == len(names)
        if not out["ok"]:
            for role in guests:
                out[f"{role}_console_tail"] = tail(work / f"{role}-console.log", 12)
                out[f"{role}_job_log_tail"] = tail(shares[role] / "job.log", 20)
        if args.keep_logs:
            keep = Path(args.keep_logs)
            keep.mkdir(parents=True, exist_ok=True)
            for role in guests:
                for f in (work / f"{role}-console.log", shares[role] / "job.log", shares[role] / "install.log",
                          shares[role] / "result.json", shares[role] / "probe.log",
                          shares[role] / "run-cluster.log", shares[role] / "run-one_machine.log",
                          shares[role] / "run-cluster_kill.log"):
                    if f.exists():
                        shutil.copy2(f, keep / f"{role}-{f.name}")
    finally:
        for q in guests.values():
            if q.running():
                q.stop()
        shutil.rmtree(work, ignore_errors=True)
    left = [str(work)] if work.exists() else []
    left += [f"qemu pid {q.proc.pid}" for q in guests.values() if q.running()]
    out["leftovers_host"] = len(left)
    if left:
        out["leftovers_host_items"] = left
        out["ok"] = False
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


# -- guest -------------------------------------------------------------------------------
class Result:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"steps": {}, "summary": {}}

    def step(self, name: str, ok: bool, seconds: float, **extra: Any) -> bool:
        self.data["steps"][name] = {"ok": bool(ok), "s": round(seconds, 1), **extra}
        self.save()
        return ok

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def timed(argv: list[str], timeout_s: float, log: Path | None = None) -> tuple[int, str, str, float]:
    t = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=GUEST_REPO)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = -9, str(exc.stdout or ""), f"ended after {timeout_s:g} s"
    if log is not None:
        log.write_text(stdout + "\n--- stderr ---\n" + stderr)
    return rc, stdout, stderr, time.monotonic() - t


def guest_main(share: Path, role: str) -> int:
    res = Result(share / "result.json")
    venv = Path(GUEST_REPO) / ".venv" / "bin"
    rc, stdout, stderr, s = timed(["bash", "scripts/install.sh"], 150 * 60, share / "install.log")
    if not res.step("install", rc == 0, s, exit=rc, tail=(stdout + stderr).strip().splitlines()[-6:]):
        return 1
    if role == "worker":
        (share / "ready").write_text("1\n")
        while not (share / "stop").exists():
            time.sleep(2)
        return 0
    t = time.monotonic()
    while not (share / "worker-ready").exists() and time.monotonic() - t < 150 * 60:
        time.sleep(2)
    keys = subprocess.run(["ssh-keyscan", "-T", "10", "-t", "ed25519", WORKER_ADDR], capture_output=True, text=True)
    Path("/root/.ssh/known_hosts").write_text(keys.stdout)
    res.data["summary"]["worker_wait_s"] = round(time.monotonic() - t, 1)
    res.save()
    # 1. the command a user runs: preflight over ssh, bring-up across both, reachability, teardown
    rc, stdout, stderr, s = timed([str(venv / "netkv"), "up", "--servers", SERVERS, *TOPOLOGY, "--mtu-bytes",
                                   str(MTU_BYTES), "--scale", repr(SCALE), "--ready-timeout-s", str(READY_TIMEOUT_S), "--prefix", "cu",
                                   "--check", "--json"], 1800, share / "up_check.log")
    rep = last_json(stdout) or {}
    res.step("up_check", rc == 0 and rep.get("pings_ok") == rep.get("pings_total") and bool(rep.get("pings_total")),
             s, exit=rc, pings=f"{rep.get('pings_ok')}/{rep.get('pings_total')}", up_s=rep.get("up_s"),
             steps_s=rep.get("steps_s"), crossing_links=rep.get("crossing_links"),
             placement=rep.get("placement"), stderr_tail=stderr.strip().splitlines()[-6:])
    # 2. a fabric of its own: every pair, the rates, the teardown on both guests
    rc, stdout, stderr, s = timed([str(venv / "python"), "-m", "guests.clustercheck", "probe", "--prefix", "cp"],
                                  1800, share / "probe.log")
    probe = last_json(stdout) or {}
    res.data["summary"].update({k: probe.get(k) for k in ("pairs", "rates", "clock", "leftovers")})
    res.step("probe", rc == 0 and bool(probe.get("ok")), s, exit=rc, stderr_tail=stderr.strip().splitlines()[-6:])
    # 3. a short replay across both: workers on the worker guest, the frontend on the head; then
    # the same replay on the head alone, for transfers of the same tier that cross no machine
    # and one more across both in which a decode worker on the worker guest is killed and restarted
    # (ended by the hang-up of its ssh session; its restart binds the same port only if it is gone)
    kill_scenario = Path("/var/tmp/cluster-check-kill.json")
    kill_scenario.write_text(json.dumps(KILL_SCENARIO))
    runs: dict[str, Any] = {}
    across = ["--servers", SERVERS, "--clock-bound-ms", repr(RUN_CLOCK_BOUND_MS)]
    for label, where in (("cluster", [*across, "--prefix", "cr", "--scenario", "none"]),
                         ("one_machine", ["--switch-mode", "per_switch", "--prefix", "co", "--scenario", "none"]),
                         ("cluster_kill", [*across, "--prefix", "ck", "--scenario", str(kill_scenario)])):
        run_out = Path(f"/var/tmp/cluster-check-{label}")
        shutil.rmtree(run_out, ignore_errors=True)
        rc, stdout, stderr, s = timed([str(venv / "netkv"), "run", *where, *TOPOLOGY, "--mtu-bytes", str(MTU_BYTES),
                                       "--scale", repr(SCALE), "--ready-timeout-s", str(READY_TIMEOUT_S),
                                       "--schedulers", "round_robin" if label == "cluster_kill" else RUN_SCHEDULERS,
                                       "--max-requests", str(RUN_REQUESTS), "--set", "startup_timeout_s=600",
                                       "--set", "drain_timeout_s=600", "--out", str(run_out), "--quiet"],
                                      3600, share / f"run-{label}.log")
        frc, fout, ferr, _ = timed([str(venv / "python"), "-m", "guests.clustercheck", "run-facts", "--out",
                                    str(run_out)], 600)
        facts = last_json(fout) or {"error": (ferr.strip().splitlines() or ["no output"])[-1]}
        runs[label] = {"exit": rc, "s": round(s, 1), "facts": facts, "stderr_tail": stderr.strip().splitlines()[-6:]}
    res.data["summary"]["run"] = runs
    cluster_run, alone, kill = runs["cluster"], runs["one_machine"], runs["cluster_kill"]
    events = kill["facts"].get("fault_events") or []
    killed_and_back = [e.get("kind") for e in events] == ["worker_kill", "worker_restart"] \
        and all(str(e.get("outcome", "")).startswith("ok") for e in events)
    background = ((kill["facts"].get("schedulers") or {}).get("round_robin") or {}).get("background") or {}
    flowed = background.get("started") == 1 and int(background.get("intervals") or 0) > 0
    res.step("run", cluster_run["exit"] == 0 and bool(cluster_run["facts"].get("ok"))
             and alone["exit"] == 0 and bool(alone["facts"].get("complete"))
             and kill["exit"] == 0 and bool(kill["facts"].get("complete")) and killed_and_back and flowed,
             cluster_run["s"] + alone["s"] + kill["s"])
    # 4. netkv clean on both guests: nothing left to remove
    for prefix in ("cp", "cr", "co", "ck"):
        rc, stdout, stderr, s = timed([str(venv / "netkv"), "clean", "--prefix", prefix, "--servers", SERVERS], 600)
        if rc != 0:
            break
    res.step("clean", rc == 0, s, exit=rc, output=(stdout + stderr).strip().splitlines()[-3:])
    return 0


def probe(prefix: str) -> dict[str, Any]:
    """In the head guest's venv: the fabric across both guests, checked."""
    from fabric import cleanup, remote
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from fabric.system import run as trun
    from topologies import parse_params

    params = parse_params([TOPOLOGY[i + 1] for i in range(2, len(TOPOLOGY), 2)])
    servers = [{"name": name, "address": addr} for name, addr in (e.split("=") for e in SERVERS.split(","))]
    tb = Testbed(TestbedConfig(topology="fattree", params=params, servers=servers, mtu_bytes=MTU_BYTES,
                               scale=SCALE, prefix=prefix, ready_timeout_s=READY_TIMEOUT_S))
    out: dict[str, Any] = {"ok": False}
    try:
        try:
            rep = tb.up(verify=False)
        except Exception as exc:  # BringUpError, PreflightError, ConfigError: one line
            out["error"] = str(exc)
            return out
        out["up_s"] = round(rep.up_s, 1)
        out["clock"] = [{"server": s["server"], **(s.get("clock") or {})} for s in (rep.servers or {}).get("servers", [])]
        gpus = tb.topo.gpu_names()
        pairs = [(a, b) for a in gpus for b in gpus if a != b]
        results = trun_many(tb, [tb.in_host(a, ["ping", "-n", "-q", "-c", "2", "-W", "3", tb.topo.ip_of(b)])
                                 for a, b in pairs])
        failed = [f"{a}->{b}" for (a, b), rc in zip(pairs, results) if rc != 0]
        out["pairs"] = {"total": len(pairs), "ok": len(pairs) - len(failed), "failed": failed}
        out["rates"] = measure_rates(tb, ((gpus[0], gpus[-1]), (gpus[0], gpus[1])))  # across both tunnels; inside
    finally:
        left = tb.down()
        status = trun(tb.sites.on_server(tb.sites.workers[0], remote.status_argv(prefix)), check=False)
        out["leftovers"] = {"head": cleanup.leftovers(prefix).total, "teardown": left.as_dict(),
                            "worker": remote.leftovers_total(status.stdout)}
    # the same fabric on the head alone: the same tier-3 flow without tunnels, the comparison
    alone = Testbed(TestbedConfig(topology="fattree", params=params, mtu_bytes=MTU_BYTES, scale=SCALE,
                                  switch_mode="per_switch", prefix=prefix, ready_timeout_s=READY_TIMEOUT_S))
    try:
        alone.up(verify=False)
        out["rates_one_machine"] = measure_rates(alone, ((gpus[0], gpus[-1]),))
    except Exception as exc:
        out["one_machine_error"] = str(exc)
    finally:
        alone.down()
        out["leftovers"]["head_after_one_machine"] = cleanup.leftovers(prefix).total
    out["ok"] = (out.get("pairs", {}).get("failed") == [] and bool(out.get("rates"))
                 and all(0.90 <= r["ratio"] <= 1.05 for r in out["rates"])
                 and out["leftovers"]["head"] == 0 and out["leftovers"]["worker"] == 0
                 and out["leftovers"]["head_after_one_machine"] == 0)
    return out


def measure_rates(tb: Any, pairs: Any) -> list[dict[str, Any]]:
    """iperf3 over each (src, dst) of a running testbed, against the path's
    shaped bottleneck, with every server's busy share while it runs."""
    from fabric.system import run as trun

    rates = []
    for src, dst in pairs:
        configured = tb.topo.bottleneck_gbps(src, dst) * 1000 / tb.config.scale
        server = tb.popen(dst, ["timeout", "120", "iperf3", "-s", "-1", "-B", tb.topo.ip_of(dst)], kind="iperf3",
                          marker="iperf3", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(3.0)
            before = busy_ticks(tb)
            text = trun(tb.in_host(src, ["iperf3", "-c", tb.topo.ip_of(dst), "-t", str(RATE_SECONDS),
                                         "-O", str(RATE_OMIT_S), "-J"]), timeout_s=RATE_SECONDS + 120).stdout
            after = busy_ticks(tb)
        finally:
            server.kill()
            server.wait()
        measured = float(json.loads(text)["end"]["sum_received"]["bits_per_second"]) / 1e6
        crosses = sum(1 for c in (tb.sites.plan.crossing if tb.sites.plan else [])
                      if {c.lower, c.upper} <= set(tb.topo.path(src, dst)))
        rates.append({"path": f"{src}->{dst}", "tier": tb.topo.tier_distance(src, dst),
                      "tunnels_crossed": crosses, "configured_mbps": round(configured, 3),
                      "measured_mbps": round(measured, 3), "ratio": round(measured / configured, 3),
                      "cpu_busy_pct": {k: round(100.0 * (after[k][0] - before[k][0])
                                                / max(1, after[k][1] - before[k][1]), 1) for k in after}})
    return rates


def busy_ticks(tb: Any) -> dict[str, tuple[int, int]]:
    """Per server: (busy, total) CPU ticks of /proc/stat (the head read here,
    each worker over its ssh connection): the busy share of a server while a
    flow runs, its side of the envelope."""
    from fabric.system import run as trun

    out = {}
    for server in [None, *tb.sites.workers]:
        text = trun(tb.sites.on_server(server, ["head", "-n", "1", "/proc/stat"]), check=False).stdout.split()
        ticks = [int(t) for t in text[1:] if t.isdigit()]
        if len(ticks) >= 5:
            idle = ticks[3] + ticks[4]  # idle + iowait
            out["head" if server is None else server.name] = (sum(ticks) - idle, sum(ticks))
    return out


def trun_many(tb: Any, commands: list[list[str]]) -> list[int]:
    from fabric.system import run_many

    return [r.returncode for r in run_many(commands, workers=tb.parallel)]


def run_facts(out: Path) -> dict[str, Any]:
    """In the head guest's venv: what the replay across both guests left in
    ``out``: per scheduler, requests in and records out, the transfers that
    crossed guests and their idle-path ratios (measured over ideal, by the
    rule of lab.transfers), the clocks (offset, uncertainty, how far the offset
    moved, problems) and each server's envelope."""
    from fabric.config import TestbedConfig
    from lab.transfers import idle_transfers
    from netkv.records import read_records
    from netkv.serving.config import ReplayConfig
    from netkv.stats import percentile

    exp = read_json(out / "experiment.json") or {}
    cfg = TestbedConfig.from_json(exp.get("testbed") or {})
    topo = cfg.validate()
    plan = cfg.cluster_plan(topo)
    tunnels = {frozenset((c.lower, c.upper)) for c in (plan.crossing if plan else [])}
    facts: dict[str, Any] = {"schedulers": {}}
    complete = clocked = bool(exp.get("schedulers"))
    for name in exp.get("schedulers") or []:
        run_dir = out / name
        summary = read_json(run_dir / "summary.json") or {}
        run = read_json(run_dir / "run.json") or {}
        envelope = read_json(run_dir / "envelope.json") or {}
        records = read_records(run_dir / "records.jsonl") if (run_dir / "records.jsonl").exists() else []
        requests_in = len(ReplayConfig.load(run_dir / "config.json").window().requests)

        def crosses(r: dict[str, Any]) -> bool:
            path = topo.path(str(r["prefill"]), str(r["decode"]))
            return any(frozenset(hop) in tunnels for hop in zip(path, path[1:]))

        moved = [r for r in records if r.get("status") == "ok" and r.get("prefill") and r.get("decode")]
        crossing = {str(r["request_id"]) for r in moved if crosses(r)}
        idle = idle_transfers(topo, cfg.scale, cfg.mtu_bytes, records)
        idle_crossing = [t for t in idle if t.request_id in crossing]
        idle_inside = [t for t in idle if t.request_id not in crossing]
        tiers = sorted({t.tier_distance for t in idle})

        def medians(ts: list[Any]) -> dict[str, Any]:
            """How many, and the median ratio, ideal and measured time (ms), with the tiers seen."""
            return {"n": len(ts), "tiers": sorted({t.tier_distance for t in ts}),
                    "ratio_median": percentile([t.ratio for t in ts], 50, method="lower"),
                    "ratio_max": max((t.ratio for t in ts), default=None),
                    "ideal_ms_median": percentile([t.ideal_ms for t in ts], 50, method="lower"),
                    "measured_ms_median": percentile([t.measured_ms for t in ts], 50, method="lower")}

        clocks = run.get("clocks") or {}
        entry = {
            "requests_in": requests_in, "records_out": len(records), "ok": summary.get("ok"),
            "problems": summary.get("problems"), "transfers": len(moved), "crossing_guests": len(crossing),
            "idle_crossing": medians(idle_crossing), "idle_inside": medians(idle_inside),
            "idle_by_tier": {str(k): medians([t for t in idle if t.tier_distance == k]) for k in tiers},
            "ttft_mean_ms": summary.get("ttft_mean_ms"),
            "clocks": {n: {k: v for k, v in info.items() if k != "series"} | {"measurements": len(info["series"])}
                       for n, info in (clocks.get("servers") or {}).items()},
            "clock_problems": clocks.get("problems"),
            "envelope": {"within": envelope.get("within_envelope"), "limiting": envelope.get("limiting_resource"),
                         "head_machine_busy_pct_p95": envelope.get("machine_busy_pct_p95"),
                         "servers": {n: {"within": e.get("within_envelope"),
                                         "machine_busy_pct_p95": e.get("machine_busy_pct_p95"),
                                         "switch_cpu_pct_p95": e.get("switch_cpu_pct_p95"),
                                         "error": e.get("error")}
                                     for n, e in (envelope.get("servers") or {}).items()}},
        }
        events_path = run_dir / "events.jsonl"
        if events_path.exists():
            keep = ("kind", "host", "outcome", "detected_ms", "detected_by", "requests_failed", "back_t_s")
            facts.setdefault("fault_events", []).extend(
                {k: e.get(k) for k in keep if k in e}
                for e in (json.loads(line) for line in events_path.read_text().splitlines() if line.strip()))
        client_log = run_dir / "background" / "flow0-client.log"
        if client_log.exists():  # the scenario's background flow: started, and its one-second intervals
            entry["background"] = {"started": envelope.get("background_flows_started"),
                                   "intervals": sum("bits/sec" in line for line in
                                                    client_log.read_text(errors="replace").splitlines())}
        facts["schedulers"][name] = entry
        complete = complete and entry["problems"] == [] and entry["records_out"] == entry["requests_in"]
        clocked = clocked and bool(entry["clocks"]) and not entry["clock_problems"]
    # some transfers crossed guests (round-robin's do; a scheduler that prefers near decodes may send none)
    facts["crossing_guests"] = sum(e["crossing_guests"] for e in facts["schedulers"].values())
    facts["complete"] = complete  # every scheduler: requests in = records out, no problem
    facts["ok"] = complete and clocked and facts["crossing_guests"] > 0  # and, across servers, one timeline
    return facts


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cluster-check",
        description="Boot two qemu guests from scripts/vm-check's image on a management network of their own and "
                    "check the testbed across them: netkv up --servers (preflight over ssh, Mininet Cluster "
                    "Edition, gretap tunnels shaped at both ends), every GPU pair reachable, iperf3 across the "
                    "tunnels against the shaped rate, a short netkv run across both (requests in = records out, "
                    "transfers crossing guests, clocks, each server's envelope), teardown and netkv clean "
                    "leaving nothing on either guest. "
                    "Prints one JSON object. Needs root; opt-in (not CI): long under software emulation.")
    ap.add_argument("--base", required=False, default=str(DEFAULT_CACHE / "provisioned.qcow2"),
                    help="a provisioned guest disk: the overlay `scripts/vm-check --overlay FILE` keeps "
                         "(default: %(default)s)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="guest image cache (default: %(default)s)")
    ap.add_argument("--work-parent", default="/var/tmp", help="where the run's temporary directory goes")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--cpus", type=int, default=1, help="vCPUs per guest (default: %(default)s)")
    ap.add_argument("--memory-mb", type=int, default=3072, help="memory per guest (default: %(default)s)")
    ap.add_argument("--timeout-min", type=float, default=120, help="stop the guests after this long")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the consoles, job logs and results here")
    sub = ap.add_subparsers(dest="mode")
    g = sub.add_parser("guest", help="(inside a guest) its part of the check")
    g.add_argument("--share", required=True)
    g.add_argument("--role", choices=("head", "worker"), required=True)
    p = sub.add_parser("probe", help="(inside the head guest) the fabric across both guests, checked")
    p.add_argument("--prefix", required=True)
    r = sub.add_parser("run-facts", help="(inside the head guest) what the replay across both guests left")
    r.add_argument("--out", required=True)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.mode == "guest":
            return guest_main(Path(args.share), args.role)
        if args.mode == "probe":
            out = probe(args.prefix)
            print(json.dumps(out))
            return 0 if out["ok"] else 1
        if args.mode == "run-facts":
            facts = run_facts(Path(args.out))
            print(json.dumps(facts))
            return 0 if facts["ok"] else 1
        return host_main(args)
    except VmCheckError as exc:
        print(f"cluster-check: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
