"""The paper's question at scale, on the simulator: the network-heavy baselines
campaign on a larger fat-tree.

``python -m bench simpaper [--gpus 1024] [--windows 1200,1800,2400]
[--duration-s 60] [--schedulers ...] [--jobs N] [--plan-only] --out DIR`` runs
``experiments/network-heavy-baselines.json`` (the point and the baselines of
the skeptic's table, docs/evaluation.md) with ``netkv simulate`` on
``topologies.catalog.fattree_at(gpus)``, and prints one JSON object: per
scheduler the mean TTFT with its 95% interval across windows, SLO attainment
and NetKV's decision time (p50/p99 over the campaign's decisions, with the
number of decode instances it ranked), and NetKV's paired change against
every other scheduler with its interval and verdict, as ``netkv report``
computes them (the campaign's ``campaign.json`` is in ``DIR``).

What changes with the size, and nothing else:

* the fabric: ``gpus / 32`` pods of the default's shape (its rates and its
  oversubscription per tier), the default placement (prefill and decode mixed
  in every server);
* the load: ``trace_replicas = gpus / 64`` phase-shifted copies of the trace,
  each with its own prefixes (:mod:`netkv.traces`), so the load per GPU is
  the 64-GPU campaign's;
* the congestion: the 64-GPU campaign's ``core-hotspot`` flow (the first GPU
  of pod 0 to the first GPU of pod 1, TCP at 150 Gbit/s for the whole run),
  once per pair of pods (pod 2k to pod 2k + 1), so every pod has one loaded
  path through the core as at 64 GPUs; written beside the run directory as
  ``<DIR>-scenario.json`` (the saved ``experiment.json`` names it, so
  ``netkv simulate --experiment DIR/experiment.json`` repeats the campaign)
  and saved in the run directory as every scenario is.

The windows are the 64-GPU campaign's (1200, 1800 and 2400 s); nothing was
tuned on them.  The A/A label is left out by default: on the simulator a
replay repeated is the same replay (its difference is exactly zero).
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

from netkv.repo import REPO_ROOT
from netkv.stats import percentile
from netkv.records import read_records
from topologies import TopologyError, build
from topologies.catalog import fattree_at

EXPERIMENT = REPO_ROOT / "experiments" / "network-heavy-baselines.json"
BASE_GPUS = 64  # the trace's load is the 64-GPU fabric's
HOTSPOT_GBPS = 150.0  # scenarios/core-hotspot.json's flow
DEFAULT_SCHEDULERS = ("round_robin", "dynamo_decode", "tuned_cache_load", "static_topology", "netkv_static", "netkv")


def hotspot_scenario(gpus: int) -> dict[str, Any]:
    topo = build("fattree", fattree_at(gpus))
    first: dict[Any, str] = {}
    for node in topo.gpus:
        first.setdefault(node.pod, node.name)
    pods = sorted(first)
    flows = [{"src": first[pods[k]], "dst": first[pods[k + 1]], "start_s": 0, "duration_s": 3600,
              "rate_gbps": HOTSPOT_GBPS, "protocol": "tcp"} for k in range(0, len(pods) - 1, 2)]
    return {"name": f"core-hotspot-x{len(flows)}",
            "description": f"scenarios/core-hotspot.json's flow once per pair of pods of the {gpus}-GPU fat-tree "
                           f"(pod 2k to pod 2k+1): {len(flows)} loaded core paths (bench simpaper)",
            "flows": flows}


def experiment(gpus: int, schedulers: list[str], windows: list[float], duration_s: float,
               scenario_path: Path) -> dict[str, Any]:
    exp = json.loads(EXPERIMENT.read_text())
    known = set(exp["schedulers"])
    unknown = [s for s in schedulers if s not in known]
    if unknown:
        raise ValueError(f"scheduler {unknown[0]!r} is not in {EXPERIMENT.name}: {', '.join(exp['schedulers'])}")
    exp["description"] = f"{exp['description']} -- at {gpus} GPUs on the simulator (bench simpaper)"
    exp["schedulers"] = schedulers
    exp["variants"] = {k: v for k, v in exp.get("variants", {}).items() if k in schedulers}
    exp["scenario"] = str(scenario_path)
    exp["testbed"] = {**exp.get("testbed", {}), "params": fattree_at(gpus)}
    exp["replay"] = {**exp["replay"], "duration_s": duration_s, "trace_replicas": gpus // BASE_GPUS}
    exp["window_starts_s"] = windows
    return exp


def summarise(out: Path, wall_s: float) -> dict[str, Any]:
    camp = json.loads((out / "campaign.json").read_text())
    rows: dict[str, Any] = {}
    for label, figures in camp["schedulers"].items():
        rows[label] = {k: figures[k] for k in ("ttft_mean_ms", "ttft_p99_ms", "ttft_slo_attainment") if k in figures}
    decisions: list[float] = []
    examined = 0.0
    for rec_path in sorted(out.glob("w*/netkv/records.jsonl")):
        for rec in read_records(rec_path):
            if rec.get("decision_us") is not None:
                decisions.append(float(rec["decision_us"]))
                examined = max(examined, float((rec.get("score_terms") or {}).get("candidates_examined", 0)))
    return {"schedulers": rows,
            "netkv_change_pct": camp["ttft_mean_change_pct"].get("netkv", {}),
            "netkv_slo_change_pp": camp["ttft_slo_attainment_change_pp"].get("netkv", {}),
            "netkv_decision_us": {"n": len(decisions), "p50": percentile(decisions, 50) if decisions else None,
                                  "p99": percentile(decisions, 99) if decisions else None,
                                  "decodes_examined_max": examined},
            "nothing_lost": camp.get("nothing_lost"), "wall_s": round(wall_s, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simpaper", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1024, help="fat-tree size, a multiple of 64 (default: 1024)")
    ap.add_argument("--windows", default="1200,1800,2400", help="window starts, s (default: 1200,1800,2400)")
    ap.add_argument("--duration-s", type=float, default=60.0, help="window length, s (default: 60)")
    ap.add_argument("--schedulers", default=",".join(DEFAULT_SCHEDULERS),
                    help=f"labels of {EXPERIMENT.name} (default: {','.join(DEFAULT_SCHEDULERS)})")
    ap.add_argument("--jobs", type=int, default=1, help="replays at once (netkv simulate --jobs; default 1)")
    ap.add_argument("--out", type=Path, required=True, help="the campaign's run directory (must not exist)")
    ap.add_argument("--plan-only", action="store_true",
                    help="write the experiment (OUT-experiment.json, its scenario OUT-scenario.json) and stop: "
                         "for `netkv simulate` or `netkv sweep --engine simulate --experiment` at this size")
    args = ap.parse_args(argv)
    try:
        if args.gpus % BASE_GPUS:
            raise ValueError(f"--gpus must be a multiple of {BASE_GPUS} (the trace's load), got {args.gpus}")
        windows = [float(w) for w in args.windows.split(",") if w.strip()]
        scen = hotspot_scenario(args.gpus)
        if args.out.exists():
            raise ValueError(f"{args.out} exists: give a new run directory")
        scen_path = args.out.with_name(args.out.name + "-scenario.json").resolve()
        scen_path.parent.mkdir(parents=True, exist_ok=True)
        scen_path.write_text(json.dumps(scen, indent=2) + "\n")
        exp = experiment(args.gpus, [s.strip() for s in args.schedulers.split(",") if s.strip()], windows,
                         args.duration_s, scen_path)
        if args.plan_only:
            plan = args.out.with_name(args.out.name + "-experiment.json").resolve()
            plan.write_text(json.dumps(exp, indent=2) + "\n")
            print(json.dumps({"benchmark": "simpaper", "gpus": args.gpus, "experiment": str(plan),
                              "scenario": str(scen_path)}))
            return 0
        with tempfile.TemporaryDirectory(prefix="simpaper-") as tmp:
            exp_path = Path(tmp) / "experiment.json"
            exp_path.write_text(json.dumps(exp, indent=2) + "\n")
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "cli.main", "simulate", "--experiment", str(exp_path),
                                   "--jobs", str(args.jobs), "--out", str(args.out)], cwd=REPO_ROOT, text=True, stdout=subprocess.DEVNULL)
            wall_s = time.monotonic() - t0
    except (ValueError, TopologyError) as exc:
        ap.error(str(exc))
    if done.returncode != 0:
        print(f"bench simpaper: netkv simulate failed (exit {done.returncode})", file=sys.stderr)
        return 1
    print(json.dumps({"benchmark": "simpaper", "gpus": args.gpus, "windows": windows, "duration_s": args.duration_s,
                      "trace_replicas": args.gpus // BASE_GPUS, "jobs": args.jobs, "scenario": scen["name"], "out": str(args.out),
                      **summarise(args.out, wall_s)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
