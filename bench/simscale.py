"""How the simulator scales: one replay per size of the four-tier fat-tree.

``python -m bench simscale [--gpus 256,1024] [--sim-s 60] [--schedulers netkv] [--load replicate]``
runs ``netkv simulate`` once per size and scheduler, each in a process of its
own, and reports per size: the platform's routes, wall time per simulated
second, the peak resident memory of the largest process, the scheduling
decisions per wall second, and the decision time (``decision_us``, p50 and
p99) with the number of decode instances it ranked.

**The sizes** are ``topologies.catalog.fattree_at(gpus)``: the default
fat-tree's pod of 32 GPUs, its 2 core switches, its rates and its
oversubscription, with ``gpus / 32`` pods, so the naming and the tiers are
those of every other run.  (Until 2026-12-06 this benchmark used pods of 64
GPUs, 4 racks and 4 aggregation switches each, under 4 cores.)

**The load** grows with the GPUs, ``n = gpus / 64`` times the trace's, in one
of two ways (``--load``):

* ``replicate`` (the default): ``n`` copies of the trace at once, each shifted
  by 1/n of the trace's cycle and with prefixes of its own (replay setting
  ``trace_replicas``, :mod:`netkv.traces`); a run may last up to the trace's
  hour at any size, and each copy's prefix reuse per second is the trace's;
* ``compress``: one copy replayed ``n`` times faster (``rate_multiplier``), so
  ``sim_s`` simulated seconds take ``n x sim_s`` seconds of the trace and the
  hour bounds a run at ``3,600 / n`` simulated seconds (225 s at 1,024 GPUs);
  conversations arrive closer together, which raises prefix reuse per second.

The targets of the scale work, reported as met or not: 1,024 GPUs at no more
than one wall second per simulated second (10 simulated minutes in under 10
minutes), and 8,192 GPUs running at all within this machine's memory (a size
the simulator refuses before building is reported with its one line). A
benchmark to read, not a test: the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netkv.records import read_records
from netkv.repo import REPO_ROOT
from netkv.stats import percentile
from topologies.catalog import fattree_at

BASE_GPUS = 64  # the trace's load is the default 64-GPU fabric's: sizes are whole multiples of it
WALL_PER_SIM_TARGET = 1.0  # 10 simulated minutes in under 10 minutes, at 1,024 GPUs
TRACE_START_S = 0.0

# runs a command and prints the peak resident memory of its largest descendant (ru_maxrss of
# RUSAGE_CHILDREN counts every waited-for descendant: netkv simulate forks one process per replay)
_PEAK = ("import json, resource, subprocess, sys\n"
         "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
         "print(json.dumps({'rc': done.returncode, 'stderr': done.stderr[-4000:], "
         "'peak_rss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")


def size_params(gpus: int) -> dict[str, int]:
    if gpus < BASE_GPUS or gpus % BASE_GPUS:
        raise ValueError(f"sizes are whole multiples of {BASE_GPUS} GPUs (the trace's load), got {gpus}")
    return fattree_at(gpus)


LOADS = ("replicate", "compress")


def run_one(gpus: int, scheduler: str, sim_s: float, out: Path, load: str = "replicate") -> dict[str, Any]:
    multiplier = gpus / BASE_GPUS
    if load == "compress":
        how = ["--duration-s", f"{sim_s * multiplier:g}", "--rate-multiplier", f"{multiplier:g}"]
    else:
        how = ["--duration-s", f"{sim_s:g}", "--set", f"trace_replicas={gpus // BASE_GPUS}"]
    argv = [sys.executable, "-m", "cli.main", "simulate", "--topology", "fattree",
            *[a for k, v in size_params(gpus).items() for a in ("--param", f"{k}={v}")],
            "--schedulers", scheduler, "--start-s", f"{TRACE_START_S:g}", *how,
            "--out", str(out), "--quiet"]
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _PEAK, *argv], cwd=REPO_ROOT, capture_output=True, text=True)
    wall_s = time.monotonic() - t0
    try:
        peak = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"gpus": gpus, "scheduler": scheduler, "error": done.stderr.strip()[-500:] or "no output"}
    row: dict[str, Any] = {"gpus": gpus, "scheduler": scheduler, "load": load, "load_x": multiplier,
                           "trace_s": sim_s * multiplier if load == "compress" else sim_s, "wall_s": round(wall_s, 1),
                           "peak_rss_gib": round(peak["peak_rss_kib"] / 2**20, 2)}
    if peak["rc"] != 0:
        lines = [ln for ln in peak["stderr"].strip().splitlines() if ln.strip()]
        row["refused"] = lines[-1] if lines else f"exit {peak['rc']}"
        return row
    records = list(read_records(out / scheduler / "records.jsonl"))
    ok = [r for r in records if r.get("status") == "ok"]
    sim_span_ms = max((float(r.get("completion_ms") or r.get("arrival_ms") or 0) for r in records), default=0.0)
    decisions = [float(r["decision_us"]) for r in records if r.get("decision_us") is not None]
    eligible = [float((r.get("score_terms") or {}).get("candidates_examined", 0)) for r in records]
    row.update({
        "requests": len(records), "ok": len(ok), "simulated_s": round(sim_span_ms / 1000, 1),
        "wall_per_simulated_s": round(wall_s / (sim_span_ms / 1000), 3) if sim_span_ms else None,
        "decisions_per_wall_s": round(len(decisions) / wall_s, 1),
        "decision_us_p50": None if not decisions else round(percentile(decisions, 50) or 0, 1),
        "decision_us_p99": None if not decisions else round(percentile(decisions, 99) or 0, 1),
        "decodes_examined_max": max(eligible, default=0),
    })
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simscale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="256,1024", help="sizes, comma-separated, multiples of 64 (default: 256,1024)")
    ap.add_argument("--sim-s", type=float, default=60.0, help="simulated seconds per replay (default: 60)")
    ap.add_argument("--schedulers", default="netkv", help="comma-separated (default: netkv)")
    ap.add_argument("--load", choices=LOADS, default="replicate",
                    help="how the load grows with the GPUs: replicate (copies of the trace, default) or compress "
                         "(one copy, faster)")
    ap.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.gpus.split(",") if x.strip()]
        for g in sizes:
            size_params(g)
    except ValueError as exc:
        ap.error(str(exc))
    if not args.sim_s > 0:
        ap.error("--sim-s must be > 0")
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="simscale-") as tmp:
        base = args.out or Path(tmp)
        for g in sizes:
            for s in schedulers:
                row = run_one(g, s, args.sim_s, base / f"{g}-gpus" / s.replace(":", "_"), args.load)
                print(f"simscale: {json.dumps(row)}", file=sys.stderr)
                rows.append(row)
    at_1024 = [r for r in rows if r["gpus"] == 1024 and r.get("wall_per_simulated_s") is not None]
    at_8192 = [r for r in rows if r["gpus"] == 8192]
    targets = {
        "1024_gpus_wall_per_simulated_s_at_most_1": (None if not at_1024 else
                                                     all(r["wall_per_simulated_s"] <= WALL_PER_SIM_TARGET for r in at_1024)),
        "8192_gpus_runs": None if not at_8192 else all("requests" in r for r in at_8192),
    }
    print(json.dumps({"benchmark": "simscale", "sim_s": args.sim_s, "topology": "fattree, topologies.catalog.fattree_at",
                      "load": {"replicate": "trace_replicas = gpus / 64 phase-shifted copies",
                               "compress": "time-compressed: rate_multiplier = gpus / 64"}[args.load],
                      "runs": rows, "targets": targets}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
