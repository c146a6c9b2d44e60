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
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from typing import Sequence

import topologies
from netkv.oracle import TelemetryOracle
from netkv.request import DecodeView, Request
from netkv.schedulers import SCHEDULERS, DecodePool, Scheduler, create
from netkv.telemetry import LinkSample, TelemetrySnapshot
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


def percentile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[idx]


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
        samples.sort()
        everything.extend(samples)
        p50, p99 = percentile(samples, 0.50), percentile(samples, 0.99)
        if best is None or p99 < best[1]:
            best = (p50, p99)
    assert best is not None
    everything.sort()
    return {"p50": round(percentile(everything, 0.50), 2), "p99": round(percentile(everything, 0.99), 2),
            "p99_quietest_round": round(best[1], 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench scheduler", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated decode-set sizes")
    ap.add_argument("--reps", type=int, default=2000, help="timed decisions per scheduler and size (>= 100)")
    ap.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated scheduler names")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (percentiles are pooled over all of them)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
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
        if n not in SCHEDULERS:
            ap.error(f"unknown scheduler {n!r}; known: {', '.join(SCHEDULERS)}")

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
    for size in sizes:
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
    out = {
        "bench": "scheduler",
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
