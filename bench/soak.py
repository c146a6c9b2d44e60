"""Soak benchmark: one long replay of the trace at its own load with the fault
scenario repeating, then teardown.

``python -m bench soak [--minutes 30]`` brings the fabric up, replays
``--minutes`` of the trace (default 30) through one frontend and one set of
workers, with the events of ``--scenario`` (default ``faults``) repeated
every ``--period-s`` seconds of the replay clock (its background flows run
throughout), and tears the fabric down.  Prints one JSON object last:
requests_in, records_out (one record per request, whatever happened),
failed_by_reason, the fault events and their outcomes, the resident memory
(MB) of the controller, the frontend/driver process and the workers at the
start and end of the replay (the controller is a new process after every
controller_restart: its figure is the one running then), the driver's growth
per request replayed and per minute (a least-squares slope of its resident
memory against requests done, after the first ``--warmup-min`` minutes, when
its prefix-cache mirrors and the oracle's tables have filled), the emulator's
envelope and the leftovers after teardown.  ``--trace-memory`` also names the
driver's ten largest growth sites (``tracemalloc``, from the end of the
warm-up to the end of the replay).  A benchmark to read, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import controller_ports, fresh_out_dir

RSS_INTERVAL_S = 10.0


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class RssSampler:
    """Every RSS_INTERVAL_S while the replay runs: the controller's, this
    process's (the frontend/driver) and the workers' (sum and largest)."""

    def __init__(self, tb: Any, warmup_s: float, trace_memory: bool) -> None:
        self.tb = tb
        self.warmup_s = warmup_s
        self.trace_memory = trace_memory
        self.warm_snapshot: tracemalloc.Snapshot | None = None
        self.frontend: Any = None
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def attach(self, frontend: Any) -> None:
        self.frontend = frontend
        self.sample()
        self._thread.start()

    def sample(self) -> None:
        workers = [rss_mb(p.pid) for p in list(self.frontend.procs.values()) if p.poll() is None]
        live = [w for w in workers if w is not None]
        ctl = self.tb.controller
        if self.trace_memory and self.warm_snapshot is None and time.time() - self.frontend.t0 >= self.warmup_s:
            self.warm_snapshot = tracemalloc.take_snapshot()
        self.samples.append({
            "t_s": round(time.time() - self.frontend.t0, 1),
            "requests_done": len(self.frontend.ledger.written),
            "controller": rss_mb(ctl.pid if ctl is not None and ctl.poll() is None else None),
            "driver": rss_mb(os.getpid()),
            "workers_sum": round(sum(live), 1), "workers_max": max(live, default=None), "workers": len(live)})

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL_S):
            if self.frontend.stopping:
                break
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The driver's resident memory against requests done and against time,
    after the warm-up: least-squares slopes (KB per request, MB per minute)."""
    rows = [s for s in samples if s["t_s"] >= warmup_s and s.get("driver") is not None]
    if len(rows) < 3 or rows[-1]["requests_done"] == rows[0]["requests_done"]:
        return {"samples": len(rows), "kb_per_request": None, "mb_per_minute": None}

    def slope(xs: list[float], ys: list[float]) -> float:
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    rss = [float(s["driver"]) for s in rows]
    return {"samples": len(rows), "from_t_s": rows[0]["t_s"],
            "requests": rows[-1]["requests_done"] - rows[0]["requests_done"],
            "kb_per_request": round(1024 * slope([float(s["requests_done"]) for s in rows], rss), 3),
            "mb_per_minute": round(60 * slope([float(s["t_s"]) for s in rows], rss), 4)}


def top_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int = 10) -> list[dict[str, Any]]:
    """The ``n`` source lines whose allocations grew most between two snapshots."""
    return [{"where": str(s.traceback[0]), "kb": round(s.size_diff / 1024, 1), "blocks": s.count_diff}
            for s in after.compare_to(before, "lineno")[:n]]


def repeated(events: list[Any], period_s: float, duration_s: float) -> list[Any]:
    """The events again every period_s, as long as they fall inside the replay."""
    out = []
    k = 0
    while events and k * period_s < duration_s:
        out += [replace(e, t_s=e.t_s + k * period_s) for e in events if e.t_s + k * period_s < duration_s]
        k += 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="minutes of trace to replay (default 30)")
    ap.add_argument("--scenario", default="faults", help="scenario whose flows run and whose events repeat")
    ap.add_argument("--period-s", type=float, default=60.0,
                    help="the events repeat every this many seconds of the replay (default 60)")
    ap.add_argument("--scheduler", default="netkv", help="decode scheduler (default netkv)")
    ap.add_argument("--topology", default="fattree")
    ap.add_argument("--start-s", type=float, default=0.0, help="where in the trace the replay starts")
    ap.add_argument("--prefix", default="ns", help="instance prefix of the benchmark's network")
    ap.add_argument("--of-port", type=int, default=None)
    ap.add_argument("--rest-port", type=int, default=None)
    ap.add_argument("--out", help="output directory (default runs/soak-<time>)")
    ap.add_argument("--warmup-min", type=float, default=3.0,
                    help="minutes of the replay left out of the driver's growth (default 3)")
    ap.add_argument("--trace-memory", action="store_true",
                    help="trace the driver's allocations (tracemalloc; slows it) and name its growth sites")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= 600 or not args.period_s > 0:
        ap.error("--minutes must be in (0, 600] and --period-s > 0")

    from fabric.cleanup import leftovers
    from fabric.config import TestbedConfig
    from fabric.net import Testbed
    from lab import scenario as scenario_mod
    from lab.emulator import replay_under_scenario
    from lab.experiment import DEFAULT_REPLAY
    from lab.faults import MAX_EVENTS
    from netkv.serving.config import ReplayConfig

    of_port, rest_port = controller_ports(args.of_port, args.rest_port)
    cfg_tb = TestbedConfig(topology=args.topology, prefix=args.prefix, of_port=of_port, rest_port=rest_port)
    topo = cfg_tb.validate()
    duration_s = args.minutes * 60.0
    try:
        scen = scenario_mod.load(args.scenario, topo)
    except scenario_mod.ScenarioError as exc:
        ap.error(str(exc))
    events = repeated(scen.events, args.period_s, duration_s)
    if len(events) > MAX_EVENTS:
        ap.error(f"{len(events)} events in {args.minutes:g} min; at most {MAX_EVENTS}: raise --period-s")
    scen = replace(scen, events=events)
    cfg = ReplayConfig(**{**DEFAULT_REPLAY, "duration_s": duration_s, "start_s": args.start_s,
                          "topology": args.topology, "scheduler": args.scheduler, "scale_factor": cfg_tb.scale})
    requests_in = len(cfg.window().requests)
    out = fresh_out_dir(ap, args.out, "soak")
    tb = Testbed(cfg_tb)
    if args.trace_memory:
        tracemalloc.start(1)
    sampler = RssSampler(tb, args.warmup_min * 60.0, args.trace_memory)
    result: dict[str, Any] = {"bench": "soak", "minutes": args.minutes, "scenario": scen.name,
                              "period_s": args.period_s, "scheduler": args.scheduler, "topology": topo.name,
                              "out": str(out), "requests_in": requests_in}
    t0 = time.monotonic()
    try:
        tb.up()
        run_dir = out / args.scheduler
        run_dir.mkdir()
        try:
            summary, envelope = replay_under_scenario(tb, cfg, scen, run_dir, on_start=sampler.attach)
        finally:
            sampler.stop()
    except KeyboardInterrupt:
        result["error"] = "interrupted"
        summary, envelope = {}, {}
    finally:
        left = tb.down()
        result["leftovers"] = left.as_dict()
        result["leftovers_recheck"] = leftovers(args.prefix).as_dict()
    records = [json.loads(x) for x in (out / args.scheduler / "records.jsonl").read_text().splitlines()] \
        if (out / args.scheduler / "records.jsonl").exists() else []
    faults = envelope.get("fault_events", [])
    outcomes = Counter(f"{r.get('kind')}: {str(r.get('outcome', '')).split(':')[0]}" for r in faults)
    first = sampler.samples[0] if sampler.samples else {}
    last = sampler.samples[-1] if sampler.samples else {}
    result.update({
        "records_out": len(records),
        "nothing_lost": len(records) == requests_in,
        "ok": sum(1 for r in records if r["status"] == "ok"),
        "failed_by_reason": dict(Counter(r["reason"] for r in records if r["status"] != "ok").most_common()),
        "ttft_p50_ms": summary.get("ttft_p50_ms"), "ttft_p99_ms": summary.get("ttft_p99_ms"),
        "fault_events": len(faults), "fault_outcomes": dict(outcomes),
        "rss_mb_start": {k: first.get(k) for k in ("controller", "driver", "workers_sum", "workers_max")},
        "rss_mb_end": {k: last.get(k) for k in ("controller", "driver", "workers_sum", "workers_max")},
        "rss_samples": len(sampler.samples),
        "driver_growth": growth(sampler.samples, args.warmup_min * 60.0),
        "envelope": {k: envelope.get(k) for k in ("within_envelope", "limiting_resource", "switch_cpu_pct_p95",
                                                  "machine_busy_pct_p95", "switch_processes_died")},
        "wall_s": round(time.monotonic() - t0, 1),
    })
    if sampler.warm_snapshot is not None:
        result["driver_growth_sites"] = top_growth(sampler.warm_snapshot, tracemalloc.take_snapshot())
        tracemalloc.stop()
    (out / "soak.json").write_text(json.dumps({**result, "rss_series": sampler.samples}, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["nothing_lost"] and result["leftovers"]["total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
