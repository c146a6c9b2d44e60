"""Worker benchmark: what the worker processes cost and how fast a trace can be
replayed on the default fabric before idle-path transfers slow down.

The default 64-GPU fat-tree is brought up once (instance prefix ``nw``); then,
for each rate multiplier (default 1, 2, 4, 8, 16), a window of the trace is
replayed with no background traffic (scenario ``none``).  Each step lasts
about ``--step-wall-s`` seconds of arrivals: the trace window is
``step_wall_s * multiplier`` seconds long, so the request rate grows with the
multiplier while the step's wall time stays the same.

Per step:

* worker RSS: ``VmRSS`` of every worker process from ``/proc/<pid>/status``,
  sampled every ``--sample-s``; the maximum over all workers and samples;
* worker CPU: utime + stime of every worker from ``/proc/<pid>/stat`` between
  the first sample after the first arrival and the last sample before the
  last record's final stamp, summed over workers, in % of one core;
* the frontend's CPU (this process: frontend, scheduler and samplers) over the
  same interval;
* transfers on idle paths (no other transfer crossed a directed hop of the
  path while it ran, ideal >= 5 ms; ``lab.transfers``): measured time over
  ideal time (payload at the path's emulated bottleneck rate), p50 / p99;
* the switch process's CPU envelope (``EmulatorMeter``);
* the load average of the machine before and after.

A step *passes* when every request ends ok, the records are consistent, at
least ``--min-idle`` idle transfers were measured and their p99 ratio is at
most ``--max-ratio`` (1.2).  ``max_rate_rps`` is the request rate (requests in
the window / its wall length) of the fastest passing step; the sweep stops at
every multiplier (``--stop-on-fail`` ends it at the first failing step).

``offered_mbps_hops`` is the load this replay's own KV transfers put on the
emulator: each transfer's emulated bytes times the links of its path, spread
over its measured duration, per second (mean and busiest second).  Beside the
switch CPU it tells this replay's share from that of other tenants.

Targets: ``rss_mb_max`` < 40 (MiB), p99 idle ratio <= 1.2 at the reported rate.
Other testbeds on the same machine share the single ovs-vswitchd process and
the two cores; the load averages in the output say how busy the machine was.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fabric.config import TestbedConfig
from fabric.net import BringUpError, Testbed
from fabric.system import PreflightError, cpu_ticks
from lab import scenario as scenario_mod
from lab.emulator import MininetLauncher, metered_replay
from lab.transfers import IDLE_MIN_IDEAL_MS, idle_transfers
from netkv.records import read_records
from netkv.serving.config import DEFAULT_TRACE, ReplayConfig
from netkv.stats import percentile

from .common import controller_ports, fresh_out_dir

TARGETS = {"rss_mb_max": 40.0, "transfer_ratio_p99": 1.2}
HZ = os.sysconf("SC_CLK_TCK")


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return None


@dataclass
class Round:
    t_epoch_s: float
    worker_ticks: dict[int, int]
    self_ticks: int


@dataclass
class SamplingLauncher:
    """MininetLauncher that remembers every worker's pid and samples RSS and
    CPU ticks of all of them (and of this process) every ``interval_s``."""

    inner: MininetLauncher
    interval_s: float
    pids: dict[str, int] = field(default_factory=dict)
    rss_kb_max: dict[str, int] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def data_addr(self, host: str) -> tuple[str, int]:
        return self.inner.data_addr(host)

    def netns_path(self, host: str) -> str | None:
        return self.inner.netns_path(host)

    def popen(self, host: str, argv: list[str], log_path: Path) -> Any:
        proc = self.inner.popen(host, argv, log_path)
        self.pids[host] = proc.pid
        return proc

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="worker-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval_s):
            ticks: dict[int, int] = {}
            for host, pid in list(self.pids.items()):
                rss = _rss_kb(pid)
                if rss is not None:
                    self.rss_kb_max[host] = max(self.rss_kb_max.get(host, 0), rss)
                t = cpu_ticks(pid)
                if t is not None:
                    ticks[pid] = t
            self.rounds.append(Round(time.time(), ticks, cpu_ticks(me) or 0))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def cpu_pct(self, t0_epoch_s: float, t1_epoch_s: float) -> dict[str, Any]:
        """Workers' (summed) and this process's CPU between the first round at
        or after t0 and the last round at or before t1, in % of one core."""
        inside = [r for r in self.rounds if t0_epoch_s <= r.t_epoch_s <= t1_epoch_s]
        if len(inside) < 2:
            return {"workers_cpu_pct": None, "frontend_cpu_pct": None, "cpu_interval_s": None}
        a, b = inside[0], inside[-1]
        span = b.t_epoch_s - a.t_epoch_s
        worker_ticks = sum(b.worker_ticks[p] - a.worker_ticks[p] for p in a.worker_ticks if p in b.worker_ticks)
        return {"workers_cpu_pct": round(100.0 * worker_ticks / HZ / span, 1),
                "frontend_cpu_pct": round(100.0 * (b.self_ticks - a.self_ticks) / HZ / span, 1),
                "cpu_interval_s": round(span, 2),
                "workers_measured": sum(1 for p in a.worker_ticks if p in b.worker_ticks)}


def _last_stamp_ms(rec: Mapping[str, Any]) -> float:
    stamps = [rec.get(k) for k in ("completion_ms", "first_token_ms", "transfer_end_ms", "arrival_ms")]
    return max(float(s) for s in stamps if s is not None)


def run_step(tb: Testbed, base: ReplayConfig, multiplier: float, step_wall_s: float, out: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    from dataclasses import replace

    duration_s = step_wall_s * multiplier
    cfg = replace(base, rate_multiplier=multiplier, duration_s=duration_s)
    run_dir = out / f"x{multiplier:g}"
    run_dir.mkdir(parents=True)
    scen = scenario_mod.load("none", tb.topo)
    runner = scenario_mod.ScenarioRunner(tb, scen, run_dir / "background")
    launcher = SamplingLauncher(MininetLauncher(tb), args.sample_s)
    load_before = os.getloadavg()
    wall0 = time.monotonic()
    runner.start()
    launcher.start()
    try:
        summary, envelope = metered_replay(tb, cfg, launcher, run_dir)
    finally:
        launcher.stop()
        runner.stop()
    wall_s = time.monotonic() - wall0
    load_after = os.getloadavg()
    records = read_records(run_dir / "records.jsonl")
    t0 = float(summary["run_start_epoch_s"])
    end_ms = max((_last_stamp_ms(r) for r in records), default=0.0)
    cpu = launcher.cpu_pct(t0, t0 + end_ms / 1e3)
    idle = idle_transfers(tb.topo, tb.config.scale, tb.config.mtu_bytes, records, min_ideal_ms=args.min_ideal_ms)
    rat = [t.ratio for t in idle]
    p50, p99 = percentile(rat, 50), percentile(rat, 99)
    n = int(summary["requests"])
    rate_rps = n / (duration_s / multiplier)
    all_ok = n > 0 and summary["ok"] == n and not summary["problems"]
    reasons = []
    if not all_ok:
        reasons.append(f"{summary['failed']} of {n} requests failed {summary['failure_reasons']}"
                       + (f", problems {summary['problems'][:3]}" if summary["problems"] else ""))
    if len(idle) < args.min_idle:
        reasons.append(f"only {len(idle)} idle-path transfers (need {args.min_idle})")
    elif p99 is not None and p99 > args.max_ratio:
        reasons.append(f"idle-path p99 ratio {p99:.3f} > {args.max_ratio}")
    rss_max_kb = max(launcher.rss_kb_max.values(), default=0)
    offered = offered_mbps_hops(tb, records)
    step = {
        "rate_multiplier": multiplier, "trace_window_s": [base.start_s, base.start_s + duration_s],
        "requests": n, "ok": summary["ok"], "rate_rps": round(rate_rps, 2), "step_wall_s": round(wall_s, 1),
        "ttft_mean_ms": _r(summary.get("ttft_mean_ms")), "ttft_p99_ms": _r(summary.get("ttft_p99_ms")),
        "max_dispatch_lag_ms": _r(summary.get("max_dispatch_lag_ms")),
        "workers": len(launcher.pids), "rss_mb_max": round(rss_max_kb / 1024, 1),
        "rss_mb_median_of_worker_max": round(_median(list(launcher.rss_kb_max.values())) / 1024, 1),
        "cpu_pct_mean": cpu["workers_cpu_pct"], "frontend_cpu_pct": cpu["frontend_cpu_pct"],
        "cpu_interval_s": cpu["cpu_interval_s"],
        "idle_transfers": len(idle), "transfers": sum(1 for r in records if r.get("transfer_end_ms") is not None),
        "transfer_ratio_p50": _r(p50, 3), "transfer_ratio_p99": _r(p99, 3),
        "transfer_ratio_max": _r(max(rat), 3) if rat else None,
        "transfer_excess_ms_p99": _r(percentile([t.measured_ms - t.ideal_ms for t in idle], 99)),
        "idle_faster_than_bucket": sum(1 for t in idle if t.measured_ms < t.ideal_ms - t.bucket_ms),
        "idle_by_tier": {str(k): sum(1 for t in idle if t.tier_distance == k)
                         for k in sorted({t.tier_distance for t in idle})},
        "offered_mbps_hops_mean": offered[0], "offered_mbps_hops_max_1s": offered[1],
        "switch": {k: envelope[k] for k in ("switch_cpu_pct_mean", "switch_cpu_pct_p95", "switch_cpu_pct_max",
                                            "samples", "within_envelope")},
        "load_avg_1m_before": round(load_before[0], 2), "load_avg_1m_after": round(load_after[0], 2),
        "passed": not reasons, "why_not": reasons, "run_dir": str(run_dir),
    }
    (run_dir / "step.json").write_text(json.dumps(step, indent=2) + "\n")
    return step


def offered_mbps_hops(tb: Testbed, records: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """Emulated Mbit/s x links of this replay's transfers: mean over the
    transfers' span and the busiest one-second bin."""
    bins: dict[int, float] = {}
    for r in records:
        if r.get("transfer_start_ms") is None or r.get("transfer_end_ms") is None:
            continue
        start, end = float(r["transfer_start_ms"]) / 1e3, float(r["transfer_end_ms"]) / 1e3
        bits = float(r["bytes_sent"]) * 8 * len(tb.topo.path_links(r["prefill"], r["decode"]))
        span = max(end - start, 1e-6)
        sec = int(start)
        while sec < end:
            overlap = min(end, sec + 1) - max(start, sec)
            bins[sec] = bins.get(sec, 0.0) + bits * overlap / span
            sec += 1
    if not bins:
        return None, None
    first, last = min(bins), max(bins)
    return round(sum(bins.values()) / (last - first + 1) / 1e6, 2), round(max(bins.values()) / 1e6, 2)


def _r(value: Any, nd: int = 1) -> float | None:
    return None if value is None else round(float(value), nd)


def _median(values: list[int]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    mid = len(s) // 2
    return float(s[mid]) if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench workers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--multipliers", default="1,2,4,8,16",
                    help="comma-separated trace rate multipliers, swept upwards (default 1,2,4,8,16)")
    ap.add_argument("--step-wall-s", type=float, default=30.0,
                    help="wall seconds of arrivals per step; the trace window is this times the multiplier")
    ap.add_argument("--start-s", type=float, default=0.0, help="trace window start, seconds (default 0)")
    ap.add_argument("--trace", default=DEFAULT_TRACE, help="Mooncake-format JSONL trace")
    ap.add_argument("--scheduler", default="round_robin",
                    help="decode scheduler, static oracle (default round_robin: it spreads transfers over every "
                         "tier, most across the core, the heaviest load on the switch process of the default "
                         "schedulers; netkv keeps most transfers inside a server)")
    ap.add_argument("--tcp-congestion", default="", help="TCP congestion control in the hosts (default: the "
                                                        "kernel's, as the testbed's default)")
    ap.add_argument("--max-ratio", type=float, default=1.2, help="p99 measured/ideal on idle paths to pass")
    ap.add_argument("--min-ideal-ms", type=float, default=IDLE_MIN_IDEAL_MS,
                    help="idle transfers shorter than this ideal are not counted (emulator per-packet floor)")
    ap.add_argument("--min-idle", type=int, default=20, help="idle-path transfers a step needs to be judged")
    ap.add_argument("--sample-s", type=float, default=0.5, help="RSS/CPU sampling interval, seconds")
    ap.add_argument("--drain-timeout-s", type=float, default=60.0, help="replay drain timeout, seconds")
    ap.add_argument("--stop-on-fail", action="store_true",
                    help="stop the sweep at the first failing step (default: run every multiplier, since one "
                         "late transfer during another tenant's burst can fail a step)")
    ap.add_argument("--prefix", default="nw", help="testbed instance prefix (default nw)")
    ap.add_argument("--of-port", type=int, default=0, help="controller OpenFlow port (0: a free one)")
    ap.add_argument("--rest-port", type=int, default=0, help="controller REST port (0: a free one)")
    ap.add_argument("--out", default="", help="directory for the steps' run directories "
                                              "(default runs/bench-workers-<time>)")
    args = ap.parse_args(argv)
    try:
        multipliers = [float(x) for x in args.multipliers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--multipliers must be numbers, got {args.multipliers!r}")
    if not multipliers or any(m <= 0 for m in multipliers):
        ap.error("--multipliers must be positive numbers")
    multipliers.sort()
    out = fresh_out_dir(ap, args.out, "bench-workers")
    of_port, rest_port = controller_ports(args.of_port, args.rest_port)
    tb_cfg = TestbedConfig(prefix=args.prefix, of_port=of_port, rest_port=rest_port,
                           tcp_congestion=args.tcp_congestion)
    t_start = time.monotonic()
    steps: list[dict[str, Any]] = []
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    try:
        tb = Testbed(tb_cfg)
        base = ReplayConfig(trace_path=args.trace, start_s=args.start_s, topology=tb_cfg.topology,
                            topology_params=dict(tb_cfg.params), scale_factor=tb_cfg.scale,
                            scheduler=args.scheduler, oracle="static", drain_timeout_s=args.drain_timeout_s)
        report = None
        try:
            report = tb.up()
            print(f"bench workers: fabric up in {report.up_s:.1f} s ({report.datapath}); runs in {out}",
                  file=sys.stderr, flush=True)
            for m in multipliers:
                step = run_step(tb, base, m, args.step_wall_s, out, args)
                steps.append(step)
                print(f"bench workers: x{m:g}: {step['ok']}/{step['requests']} ok at {step['rate_rps']} req/s, "
                      f"idle {step['idle_transfers']} p50 {step['transfer_ratio_p50']} "
                      f"p99 {step['transfer_ratio_p99']}, workers CPU {step['cpu_pct_mean']}%, "
                      f"RSS max {step['rss_mb_max']} MiB, switch CPU max {step['switch']['switch_cpu_pct_max']}%, "
                      f"load {step['load_avg_1m_after']} -> {'pass' if step['passed'] else 'FAIL'}",
                      file=sys.stderr, flush=True)
                if not step["passed"] and args.stop_on_fail:
                    break
        finally:
            left = tb.down()
    except (BringUpError, PreflightError, ValueError) as exc:
        print(json.dumps({"bench": "workers", "error": str(exc), "steps": steps}))
        return 1
    passed = [s for s in steps if s["passed"]]
    best = max(passed, key=lambda s: s["rate_rps"]) if passed else None
    rss = max((s["rss_mb_max"] for s in steps), default=None)
    result: dict[str, Any] = {
        "bench": "workers", "topology": tb.topo.name, "gpus": len(tb.topo.gpus), "scale": tb_cfg.scale,
        "datapath": report.datapath if report else None,
        "tcp_congestion": report.as_dict().get("tcp_congestion") if report else None, "scenario": "none", "scheduler": args.scheduler,
        "trace": args.trace, "step_wall_s": args.step_wall_s, "multipliers": multipliers,
        "rss_mb_max": rss,
        "cpu_pct_mean": best["cpu_pct_mean"] if best else None,
        "max_rate_rps": best["rate_rps"] if best else None,
        "max_rate_multiplier": best["rate_multiplier"] if best else None,
        # secondary: fastest step at which every request ended ok, whatever the idle-path ratio
        "max_rate_rps_all_ok": max((s["rate_rps"] for s in steps if s["ok"] == s["requests"] > 0), default=None),
        "transfer_ratio_p50": best["transfer_ratio_p50"] if best else None,
        "transfer_ratio_p99": best["transfer_ratio_p99"] if best else None,
        "lowest_p99_step": min(({"rate_multiplier": s["rate_multiplier"], "rate_rps": s["rate_rps"],
                                 "transfer_ratio_p99": s["transfer_ratio_p99"]} for s in steps
                                if s["transfer_ratio_p99"] is not None),
                                key=lambda x: float(x["transfer_ratio_p99"]), default=None),
        "switch_cpu_by_step": {f"x{s['rate_multiplier']:g}": s["switch"] for s in steps},
        "steps": steps,
        # the fastest multiplier passed: the testbed may sustain more than max_rate_rps
        "sweep_capped": best is not None and best["rate_multiplier"] == multipliers[-1],
        "units": {"rss_mb": "MiB (VmRSS kB / 1024)", "cpu_pct": "% of one core, all workers together",
                  "rate_rps": "requests in the window / window wall length"},
        "notes": "cpu_pct_mean, transfer ratios are those of the max-rate step; switch CPU is the whole "
                 "ovs-vswitchd process, which other testbeds running at the same time also load",
        "leftovers": left.as_dict(), "total_s": round(time.monotonic() - t_start, 1),
        "targets": TARGETS,
    }
    result["met"] = {"rss_mb_max": rss is not None and rss < TARGETS["rss_mb_max"],
                     "transfer_ratio_p99": best is not None}
    print(json.dumps(result))
    return 0 if best is not None and result["met"]["rss_mb_max"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
