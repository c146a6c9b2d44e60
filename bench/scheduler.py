"""Decision-latency benchmark of every registered scheduler.

Builds a fat-tree large enough for the biggest decode set, a synthetic
telemetry snapshot (every directed hop loaded to a random 0-90 % of capacity),
a :class:`~netkv.oracle.TelemetryOracle` over it, and for each decode-set size
a :class:`~netkv.schedulers.DecodePool` of synthetic decode states with
prefix caches drawn from a shared block universe.  Every scheduler gets the
same pool, prefill GPU and request stream; ``time.perf_counter_ns`` brackets
each ``choose`` call.  The last line printed is one JSON object::

    {"bench": "scheduler", "decision_us": {"<|D|>": {"<scheduler>": {"p50": .., "p99": ..}}},
     "targets": {...}, "met": {...}, ...}

``netkv_list_input_us`` is NetKV on a plain list of DecodeViews (its
one-Python-pass path) for comparison; ``table_rebuild_ms`` is what NetKV pays
once per telemetry snapshot change to refresh its per-destination arrays.

``live`` (``--parts live``) times the live path instead: a trace window
replayed through the real frontend's ``dispatch`` (``workers.driver``; the
views it builds, the scheduler's ``choose``, the telemetry oracle as a live
run builds it, the records it writes) at ``--live-decodes`` decode instances,
the telemetry snapshot replaced at the controller's polling interval on the
replay's simulated clock (see :func:`live_replay`).  Per scheduler: wall and
CPU time of the decisions (``decision_us``, ``decision_cpu_us`` from the
records), medians over ``--live-repeats`` replays, against the paper's
0.5 ms.
"""

from __future__ import annotations

import argparse
import functools
import gc
import heapq
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import topologies
from netkv.oracle import StaticOracle, TelemetryOracle
from netkv.records import RecordWriter, read_records, validate_file
from netkv.request import DecodeView, Request
from netkv.schedulers import SCHEDULERS, DecodePool, Scheduler, SchedulerLoadError, create, resolve
from netkv.serving.config import ReplayConfig
from netkv.serving.decode import Done
from netkv.serving.ledger import Ledger
from netkv.serving.timing import DecisionPriority
from netkv.stats import percentile
from netkv.telemetry import LinkSample, TelemetrySnapshot
from netkv.traces import DEFAULT_TRACE
from topologies import catalog
from topologies.model import Topology

SIZES = (32, 64, 256, 1024, 4096)
KV_BYTES_PER_TOKEN = 327_680  # 80 layers x 8 KV heads x 128 dims x 2 (K, V) x 2 bytes (fp16)
TARGET_P99_US = {"64": 50.0, "4096": 500.0}
# Growth counts as ~linear when p50 grows by at most twice the ratio of |D|.
GROWTH_SLACK = 2.0


def big_fattree(gpus_needed: int) -> Topology:
    racks = 8
    pods = 2
    while pods * racks * 4 * 8 < gpus_needed:
        pods += 1
    return topologies.build("fattree", {"pods": pods, "racks_per_pod": racks, "servers_per_rack": 4})


def synthetic_snapshot(topo: Topology, t_s: float, rng: random.Random) -> TelemetrySnapshot:
    samples = {}
    for link in topo.links:
        for x, y in ((link.a, link.b), (link.b, link.a)):
            load = rng.uniform(0.0, 0.9) * link.rate_gbps
            samples[(x, y)] = LinkSample(x, y, t_s, load, link.rate_gbps, load / link.rate_gbps)
    return TelemetrySnapshot(samples)


def synthetic_views(names: Sequence[str], universe: Sequence[int], rng: random.Random) -> list[DecodeView]:
    views = []
    for name in names:
        # each decode caches a few prefix chains of the universe
        cached: set[int] = set()
        for _ in range(rng.randrange(0, 4)):
            start = rng.randrange(0, len(universe) - 16)
            cached.update(universe[start:start + rng.randrange(1, 16)])
        views.append(DecodeView(name, rng.randrange(0, 8), rng.randrange(0, 33), 32,
                                rng.randrange(0, 400_000), frozenset(cached), 64,
                                rng.randrange(0, 200_000)))
    return views


def synthetic_requests(count: int, universe: Sequence[int], rng: random.Random) -> list[Request]:
    out = []
    for i in range(count):
        blocks = rng.randrange(1, 32)
        start = rng.randrange(0, len(universe) - blocks)
        out.append(Request(f"r{i}", float(i), blocks * 512 - rng.randrange(0, 512), rng.randrange(16, 512),
                           tuple(universe[start:start + blocks])))
    return out


def _pct(values: list[float], pct: float) -> float:
    value = percentile(values, pct)
    assert value is not None
    return value


def measure(sched: Scheduler, requests: list[Request], prefill: str, decodes: Sequence[DecodeView],
            oracle: TelemetryOracle, now_s: float, reps: int, rounds: int) -> dict[str, float]:
    """p50/p99 over every decision of every round (what the targets are
    checked against), plus the p99 of the quietest round, which shows how much
    of the tail other processes sharing the CPU added."""
    clock = time.perf_counter_ns
    for r in requests[:20]:  # warm caches (paths, transfer tables, numpy)
        sched.choose(r, prefill, decodes, oracle, now_s)
    n = len(requests)
    per_round = max(100, reps // rounds)
    best: tuple[float, float] | None = None
    everything: list[float] = []
    k = 0
    for _ in range(rounds):
        samples: list[float] = []
        gc.collect()
        gc.disable()  # a collection pause is the runtime's, not the decision's
        try:
            for _ in range(per_round):
                r = requests[k % n]
                k += 1
                t0 = clock()
                sched.choose(r, prefill, decodes, oracle, now_s)
                samples.append((clock() - t0) / 1000.0)
        finally:
            gc.enable()
        everything.extend(samples)
        p50, p99 = _pct(samples, 50), _pct(samples, 99)
        if best is None or p99 < best[1]:
            best = (p50, p99)
    assert best is not None
    return {"p50": round(_pct(everything, 50), 2), "p99": round(_pct(everything, 99), 2),
            "p99_quietest_round": round(best[1], 2)}


# -- the live path: the real frontend's dispatch, telemetry changing at the polling rate ----------
LIVE_DECODES = 64
LIVE_TARGET_P99_US = 500.0  # the paper: the scheduler adds < 0.5 ms
LIVE_POLL_INTERVAL_S = 0.5  # the controller's default polling interval (controller --poll-interval-s)


class _NoLauncher:
    """The frontend is driven without worker processes: nothing is started."""

    def popen(self, host: str, argv: list[str], log_path: Path) -> subprocess.Popen:  # type: ignore[type-arg]
        raise AssertionError("the live decision benchmark starts no worker")

    def data_addr(self, host: str) -> tuple[str, int]:
        return ("127.0.0.1", 0)


class _Poller:
    """A telemetry source like the testbed's ``RestTelemetryPoller`` (the
    latest snapshot of every directed hop, stamped with the wall clock; each
    new one handed to ``on_update`` first), replaced by the benchmark whenever
    its simulated clock passes a polling instant.  The live poller does this
    in its own thread; here it runs between decisions, so its work (like the
    live poller's) is not inside a timed decision."""

    def __init__(self, topo: Topology, rng: random.Random) -> None:
        self.topo = topo
        self.rng = rng
        self.latest = TelemetrySnapshot()
        self.polls = 0
        self.on_update: Callable[[TelemetrySnapshot], None] | None = None

    def __call__(self) -> TelemetrySnapshot:
        return self.latest

    def poll(self) -> None:
        snap = synthetic_snapshot(self.topo, time.time(), self.rng)
        if self.on_update is not None:
            self.on_update(snap)
        self.latest = snap
        self.polls += 1


def live_replay(scheduler: str, decodes: int, trace_path: str, start_s: float, duration_s: float,
                poll_interval_s: float, seed: int, work_dir: Path, prepare: bool = True) -> dict[str, Any]:
    """One replay of a trace window through the serving model's ledger
    (``netkv.serving.ledger.Ledger``, as the emulator's frontend drives it: its
    prefill choice, its DecodeViews, the scheduler's ``choose`` with the
    oracle, its records) on a simulated timeline instead of worker processes:
    a request's prefill takes the perf model's time after its prefill
    instance's earlier work, its KV transfer the static oracle's estimate, its
    decode the model's single-request step time per output token; those
    events are handed to the ledger at their instants, so queue counts,
    reserved KV and prefix caches evolve as in a replay.  The telemetry
    snapshot is replaced at every ``poll_interval_s`` of the simulated clock,
    so the share of decisions that pay the oracle's refresh is the live one.
    The timings are the ones the ledger writes into its records."""
    gpus = 2 * decodes  # the mixed placement: every other GPU of a server decodes
    if gpus % 32:
        raise ValueError(f"live decode count must be a multiple of 16, got {decodes}")
    cfg = ReplayConfig(trace_path=trace_path, start_s=start_s, duration_s=duration_s, scheduler=scheduler,
                       oracle="telemetry", topology="fattree", topology_params={"pods": gpus // 32}, seed=seed)
    topo = catalog.build(cfg.topology, cfg.topology_params)
    poller = _Poller(topo, random.Random(seed))
    oracle = TelemetryOracle(topo, poller)  # as lab.emulator builds it for a live run
    if prepare:  # as lab.emulator wires its poller (absent from older oracles)
        poller.on_update = getattr(oracle, "prepare", None)
    poller.poll()
    run_dir = work_dir / scheduler
    run_dir.mkdir(parents=True)
    writer = RecordWriter(run_dir / "records.jsonl")
    priority = DecisionPriority(cfg.decision_priority)
    ledger = Ledger(cfg, topo, writer.write, oracle=oracle, decide_in=priority)
    assert len(ledger.decodes) == decodes, (len(ledger.decodes), decodes)
    static = StaticOracle(topo)
    requests = cfg.window().requests
    ledger.t0 = time.time()

    def at(ms: float) -> float:
        return ledger.t0 + ms / 1000.0

    events: list[tuple[float, int, Callable[[], Any]]] = []
    seq = itertools.count()
    prefill_free_ms: dict[str, float] = {h: 0.0 for h in ledger.prefills}
    next_poll_ms = poll_interval_s * 1000.0
    refreshed: set[str] = set()  # requests whose decision computed a new transfer table itself
    table_epoch: dict[str, int] = {}
    for req in requests:
        now_ms = req.arrival_ms
        while events and events[0][0] <= now_ms:
            heapq.heappop(events)[2]()
        while next_poll_ms <= now_ms:
            poller.poll()
            next_poll_ms += poll_interval_s * 1000.0
        order = ledger.dispatch(req, time.time())
        if order is None:
            continue  # failed before dispatch: its record is written
        flight = ledger.flights[req.request_id]
        # the oracle's table the decision read, if any, and whether the poller had prepared it
        table = oracle._tables.get(order.prefill)
        if table is not None and table_epoch.get(order.prefill) != table.epoch:
            table_epoch[order.prefill] = table.epoch
            prepared = getattr(oracle, "_prepared", None)
            if prepared is None or prepared[2].get(order.prefill) is not table:
                refreshed.add(req.request_id)
        rid = req.request_id
        start = max(now_ms, prefill_free_ms[order.prefill])
        end = start + flight.predicted_prefill_ms
        prefill_free_ms[order.prefill] = end
        xfer_ms = static.estimate(order.prefill, order.decode, order.kv_bytes, 0.0).transfer_ms
        step_ms = ledger.perf.decode_step_ms(1, req.input_tokens)
        xfer_end = end + xfer_ms
        first = xfer_end + step_ms
        done = xfer_end + step_ms * req.output_tokens
        tbt = step_ms if req.output_tokens > 1 else None
        for t_ms, event in (
            (end, functools.partial(ledger.prefilled, rid, at(start), at(end), 0)),
            (end, functools.partial(ledger.sent, rid, at(end))),
            (xfer_end, functools.partial(ledger.admitted, rid)),
            (done, functools.partial(ledger.done, Done(rid, at(xfer_end), at(xfer_end), at(first), at(done),
                                                       tbt, tbt))),
        ):
            heapq.heappush(events, (t_ms, next(seq), event))
    while events:
        heapq.heappop(events)[2]()
    writer.close()
    ledger.close()  # a scheduler with processes of its own (sglang-router:<policy>) ends them
    problems = validate_file(run_dir / "records.jsonl", [r.request_id for r in requests])
    if problems:
        raise RuntimeError(f"live replay of {scheduler}: {problems[:3]}")
    recs = [r for r in read_records(run_dir / "records.jsonl") if r["decision_us"] is not None]

    def pct(key: str, q: float, only: set[str] | None = None) -> float | None:
        vals = [float(r[key]) for r in recs if only is None or r["request_id"] in only]
        v = percentile(vals, q)
        return None if v is None else round(v, 1)

    return {
        "decisions": len(recs), "polls": poller.polls, "decisions_that_built_a_table": len(refreshed),
        # whether the decisions ran at SCHED_FIFO (root; netkv.serving.timing.DecisionPriority)
        "decision_realtime": priority.applied,
        "decision_us": {"p50": pct("decision_us", 50), "p99": pct("decision_us", 99)},
        "decision_cpu_us": {"p50": pct("decision_cpu_us", 50), "p99": pct("decision_cpu_us", 99)},
        "decision_cpu_us_that_built_a_table": {"p50": pct("decision_cpu_us", 50, refreshed),
                                               "p99": pct("decision_cpu_us", 99, refreshed)},
        "views_build_us": {"p50": pct("views_build_us", 50), "p99": pct("views_build_us", 99)},
    }


def live(names: list[str], decodes: int, repeats: int, trace_path: str, start_s: float, duration_s: float,
         poll_interval_s: float, seed: int, prepare: bool) -> dict[str, Any]:
    """Every scheduler ``repeats`` times (interleaved, so a busy spell of the
    machine hits all of them); per scheduler each repeat's figures and their
    medians."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        for k in range(repeats):
            for name in names:
                runs[name].append(live_replay(name, decodes, trace_path, start_s, duration_s, poll_interval_s,
                                              seed, Path(tmp) / f"r{k}", prepare))
    out: dict[str, Any] = {}
    for name, reps in runs.items():
        med: dict[str, Any] = {}
        for key in ("decision_us", "decision_cpu_us", "decision_cpu_us_that_built_a_table", "views_build_us"):
            med[key] = {q: _median([r[key][q] for r in reps]) for q in ("p50", "p99")}
        med["decisions"] = reps[0]["decisions"]
        med["decisions_that_built_a_table"] = reps[0]["decisions_that_built_a_table"]
        med["repeats"] = reps
        out[name] = med
        print(f"live |D|={decodes} {name}: decision p50 {med['decision_us']['p50']} p99 {med['decision_us']['p99']} us"
              f" (cpu p50 {med['decision_cpu_us']['p50']} p99 {med['decision_cpu_us']['p99']} us; those that built "
              f"a table: p99 {med['decision_cpu_us_that_built_a_table']['p99']} us, "
              f"n={med['decisions_that_built_a_table']}),"
              f" views p99 {med['views_build_us']['p99']} us", file=sys.stderr)
    return out


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals), 1) if vals else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench scheduler", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated decode-set sizes")
    ap.add_argument("--reps", type=int, default=2000, help="timed decisions per scheduler and size (>= 100)")
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated scheduler names")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (percentiles are pooled over all of them)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parts", default="pool,live",
                    help="what to measure: pool (synthetic DecodePool per size), live (the frontend's dispatch)")
    ap.add_argument("--live-decodes", type=int, default=LIVE_DECODES,
                    help="decode instances of the live part (a fat-tree of twice as many GPUs, mixed placement)")
    ap.add_argument("--live-repeats", type=int, default=3, help="replays per scheduler in the live part")
    ap.add_argument("--live-trace", default=str(DEFAULT_TRACE), help="trace the live part replays")
    ap.add_argument("--live-start-s", type=float, default=0.0, help="live window start in the trace (s)")
    ap.add_argument("--live-duration-s", type=float, default=600.0, help="live window length (s of trace)")
    ap.add_argument("--poll-interval-s", type=float, default=LIVE_POLL_INTERVAL_S,
                    help="telemetry changes this often on the live part's simulated clock")
    ap.add_argument("--no-prepare", action="store_true",
                    help="live part: do not hand new snapshots to oracle.prepare (tables rebuilt inside decisions)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"pool", "live"}:
        ap.error(f"--parts takes pool and/or live, got {args.parts!r}")
    if args.live_decodes < 16 or args.live_decodes % 16:
        ap.error(f"--live-decodes must be a positive multiple of 16, got {args.live_decodes}")
    if args.live_repeats < 1:
        ap.error(f"--live-repeats must be >= 1, got {args.live_repeats}")
    if not args.poll_interval_s > 0:
        ap.error(f"--poll-interval-s must be > 0, got {args.poll_interval_s}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}")
    if not sizes or min(sizes) < 1:
        ap.error(f"--sizes must be >= 1, got {args.sizes!r}")
    if args.reps < 100:
        ap.error(f"--reps must be >= 100 for a p99, got {args.reps}")
    if not 1 <= args.rounds <= args.reps // 100:
        ap.error(f"--rounds must be 1..reps/100 (each round >= 100 decisions), got {args.rounds}")
    names = [n.strip() for n in args.schedulers.split(",") if n.strip()]
    for n in names:
        try:
            resolve(n)
        except SchedulerLoadError as exc:
            ap.error(str(exc))

    rng = random.Random(args.seed)
    topo = big_fattree(max(sizes) + 8)
    gpus = topo.gpu_names()
    prefill = gpus[0]
    now_s = 1_000_000.0
    snapshot = synthetic_snapshot(topo, now_s - 0.2, rng)
    universe = list(range(10_000, 10_400))
    requests = synthetic_requests(500, universe, rng)
    others = gpus[1:]

    decision_us: dict[str, dict[str, dict[str, float]]] = {}
    list_input_us: dict[str, dict[str, float]] = {}
    rebuild_ms: dict[str, float] = {}
    for size in (sizes if "pool" in parts else []):
        names_d = sorted(rng.sample(others, size))
        views = synthetic_views(names_d, universe, rng)
        pool = DecodePool(views)
        row: dict[str, dict[str, float]] = {}
        for name in names:
            sched = create(name, {}, kv_bytes_per_token=KV_BYTES_PER_TOKEN, seed=args.seed)
            oracle = TelemetryOracle(topo, lambda: snapshot, max_age_ms=None)
            reps = args.reps if size <= 1024 or name == "netkv" else max(100, args.reps // 10)
            row[name] = measure(sched, requests, prefill, pool, oracle, now_s, reps,
                                min(args.rounds, reps // 100))
        decision_us[str(size)] = row
        if "netkv" in names:
            sched = create("netkv", {}, kv_bytes_per_token=KV_BYTES_PER_TOKEN)
            oracle = TelemetryOracle(topo, lambda: snapshot, max_age_ms=None)
            list_reps = args.reps if size <= 1024 else max(100, args.reps // 10)
            list_input_us[str(size)] = measure(sched, requests, prefill, views, oracle, now_s, list_reps,
                                               min(args.rounds, list_reps // 100))
            # cost of a telemetry change: the oracle recomputes each pair's
            # available bandwidth and NetKV its per-destination arrays
            sched.choose(requests[0], prefill, pool, oracle, now_s)
            fresh = TelemetrySnapshot(dict(snapshot.samples))
            oracle.source = lambda: fresh
            t0 = time.perf_counter_ns()
            sched.choose(requests[0], prefill, pool, oracle, now_s + 0.5)
            rebuild_ms[str(size)] = round((time.perf_counter_ns() - t0) / 1e6, 3)
        print(f"|D|={size}: " + ", ".join(f"{k} p50 {v['p50']} p99 {v['p99']} us" for k, v in row.items()),
              file=sys.stderr)

    targets: dict[str, object] = {f"netkv_p99_us_at_{k}": v for k, v in TARGET_P99_US.items()}
    targets["netkv_growth"] = f"p50 ratio between sizes <= {GROWTH_SLACK:g} x size ratio"
    met: dict[str, bool] = {}
    for k, limit in TARGET_P99_US.items():
        if k in decision_us and "netkv" in decision_us[k]:
            met[f"netkv_p99_us_at_{k}"] = decision_us[k]["netkv"]["p99"] < limit
    have = [s for s in sizes if "netkv" in decision_us.get(str(s), {})]
    if len(have) >= 2:
        lo, hi = min(have), max(have)
        ratio = decision_us[str(hi)]["netkv"]["p50"] / max(decision_us[str(lo)]["netkv"]["p50"], 1e-9)
        met["netkv_growth"] = ratio <= GROWTH_SLACK * hi / lo
    live_us: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    if "live" in parts:
        live_us = live(names, args.live_decodes, args.live_repeats, args.live_trace, args.live_start_s,
                       args.live_duration_s, args.poll_interval_s, args.seed, not args.no_prepare)
        if "netkv" in live_us:
            key = f"netkv_live_p99_us_at_{args.live_decodes}"
            targets[key] = LIVE_TARGET_P99_US
            targets[key.replace("_p99_us", "_cpu_p99_us")] = LIVE_TARGET_P99_US
            for field, k in (("decision_us", key), ("decision_cpu_us", key.replace("_p99_us", "_cpu_p99_us"))):
                p99 = live_us["netkv"][field]["p99"]
                met[k] = p99 is not None and p99 < LIVE_TARGET_P99_US
    out = {
        "bench": "scheduler",
        "live": {"decodes": args.live_decodes, "poll_interval_s": args.poll_interval_s,
                 "oracle_prepare": not args.no_prepare and hasattr(TelemetryOracle, "prepare"), "load_avg_1min_live_start_end": [load_before, os.getloadavg()[0]],
                 "trace": args.live_trace, "window_s": [args.live_start_s, args.live_duration_s],
                 "repeats": args.live_repeats, "schedulers": live_us,
                 "note": "p50/p99 per scheduler are medians over the repeats; decision_us is wall time, "
                         "decision_cpu_us the frontend thread's CPU time of the same call"} if live_us else None,
        "decision_us": decision_us,
        "targets": targets,
        "met": met,
        "netkv_list_input_us": list_input_us,
        "table_rebuild_ms": rebuild_ms,
        "setup": {"topology": topo.summary()["params"], "gpus": len(gpus), "prefill": prefill,
                  "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "reps": args.reps, "rounds": args.rounds,
                  "seed": args.seed,
                  "python": sys.version.split()[0]},
    }
    print(json.dumps(out, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
