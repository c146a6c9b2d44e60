"""Tuning sweep of the ``tuned_cache_load`` baseline's weights, on the testbed.

The default 64-GPU fat-tree is brought up once (instance prefix ``nw``).  For
each weight combination of ``netkv.schedulers.TUNING_GRID`` the tuning window of
the trace (default trace seconds [600, 660), disjoint from the evaluation
window [0, 60) that ``netkv run`` uses by default) is replayed with
``tuned_cache_load`` under the default congestion scenario (``hotspots``),
started afresh for each replay, with the static oracle (the baseline does not
consult the network).  ``netkv.schedulers.tune()`` drives the grid and refuses a
tuning window that overlaps the evaluation window.

Objective: the lowest mean TTFT (ms) over the tuning window's requests.  A
combination under which any request failed is excluded (its cost is
infinite).  Ties go to the first combination in grid order (``tune()``).

Equivalent combinations are measured once.  The score ``w_cache * match -
w_load * load`` ranks decodes the same way when both weights are multiplied by
one positive factor, and when that factor is a power of two the products are
exact in floating point, so the decisions are bit-identical.  Each combination
is reduced to a canonical pair (both weights divided by the power of two at or
below the larger one; zero stays zero) and a replay is run only for the first
combination of each class in grid order; the others get that replay's figures
and say which combination was measured.  The default grid {0, 0.25, 0.5, 1, 2,
4}^2 has 36 combinations in 12 classes.  ``--no-dedupe`` measures every one.

Writes ``netkv/schedulers/tuned_weights.json`` (``--write``) with the chosen
weights and their provenance: date, git commit, command, trace file and its
SHA-256, tuning and evaluation windows, scenario, replay and testbed
settings, the grid and every combination's measured mean / p50 / p99 TTFT,
SLO attainment, request counts and the switch CPU envelope of its replay.
The last line of output is one JSON object with the same content.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from fabric.config import TestbedConfig
from fabric.net import BringUpError, Testbed
from fabric.system import PreflightError
from lab import scenario as scenario_mod
from lab.emulator import MininetLauncher, metered_replay
from lab.experiment import DEFAULT_REPLAY, DEFAULT_SCENARIO
from netkv.repo import REPO_ROOT
from netkv.schedulers import TUNING_GRID, tune
from netkv.serving.config import DEFAULT_TRACE, ReplayConfig

from .common import controller_ports, fresh_out_dir

WEIGHTS_FILE = REPO_ROOT / "netkv" / "schedulers" / "tuned_weights.json"
SCHEDULER = "tuned_cache_load"


def canonical(weights: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The weights divided by the largest power of two not above the larger
    weight; combinations with equal canonical forms make identical decisions."""
    top = max(weights.values())
    if top <= 0:
        return tuple(sorted((k, 0.0) for k in weights))
    factor = 2.0 ** math.floor(math.log2(top))
    return tuple(sorted((k, v / factor) for k, v in weights.items()))


def class_name(key: tuple[tuple[str, float], ...]) -> str:
    return "_".join(f"{k}-{v:g}" for k, v in key)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _r(value: Any, nd: int = 1) -> float | None:
    return None if value is None else round(float(value), nd)


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=DEFAULT_TRACE, help="Mooncake-format JSONL trace")
    ap.add_argument("--start-s", type=float, default=600.0, help="tuning window start, trace seconds (default 600)")
    ap.add_argument("--duration-s", type=float, default=60.0, help="tuning window length, seconds (default 60)")
    ap.add_argument("--eval-start-s", type=float, default=0.0,
                    help="evaluation window start the tuning window must not overlap (default 0, as netkv run)")
    ap.add_argument("--eval-duration-s", type=float, default=60.0,
                    help="evaluation window length, seconds (default 60, as netkv run)")
    ap.add_argument("--scenario", default=DEFAULT_SCENARIO, help=f"congestion scenario (default {DEFAULT_SCENARIO})")
    ap.add_argument("--grid", action="append", metavar="KEY=V1,V2,...", default=[],
                    help="replace one axis of TUNING_GRID (repeatable), e.g. w_cache=0.5,1; a result from a "
                         "reduced grid is only written with --write given explicitly")
    ap.add_argument("--no-dedupe", action="store_true",
                    help="replay every combination, also those equivalent to one already measured")
    ap.add_argument("--max-classes", type=int, default=0,
                    help="replay at most this many classes (0: all); for trying the bench out, never for a result")
    ap.add_argument("--write", default=str(WEIGHTS_FILE), help="where to write the result ('' : nowhere)")
    ap.add_argument("--prefix", default="nw", help="testbed instance prefix (default nw)")
    ap.add_argument("--of-port", type=int, default=0, help="controller OpenFlow port (0: a free one)")
    ap.add_argument("--rest-port", type=int, default=0, help="controller REST port (0: a free one)")
    ap.add_argument("--out", default="", help="directory for the replays (default runs/tune-<time>)")
    args = ap.parse_args(argv)

    grid: dict[str, tuple[float, ...]] = {k: tuple(v) for k, v in TUNING_GRID.items()}
    for item in args.grid:
        key, sep, raw = item.partition("=")
        if not sep or key not in grid:
            ap.error(f"--grid {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(sorted(grid))}")
        try:
            grid[key] = tuple(float(x) for x in raw.split(",") if x.strip())
        except ValueError:
            ap.error(f"--grid {item!r}: values must be numbers")
    if args.grid and not any(a == "--write" or a.startswith("--write=") for a in (argv or [])):
        args.write = ""
    tuning_ms = (args.start_s * 1e3, (args.start_s + args.duration_s) * 1e3)
    eval_ms = (args.eval_start_s * 1e3, (args.eval_start_s + args.eval_duration_s) * 1e3)
    if tuning_ms[0] < eval_ms[1] and eval_ms[0] < tuning_ms[1]:
        ap.error(f"tuning window [{args.start_s}, {args.start_s + args.duration_s}) s overlaps the evaluation "
                 f"window [{args.eval_start_s}, {args.eval_start_s + args.eval_duration_s}) s")
    out = fresh_out_dir(ap, args.out, "tune")
    of_port, rest_port = controller_ports(args.of_port, args.rest_port)
    tb_cfg = TestbedConfig(prefix=args.prefix, of_port=of_port, rest_port=rest_port)
    replay_settings = {**DEFAULT_REPLAY, "oracle": "static", "trace_path": str(Path(args.trace).resolve()),
                       "start_s": args.start_s, "duration_s": args.duration_s}
    base = ReplayConfig.from_dict({**replay_settings, "topology": tb_cfg.topology,
                                   "topology_params": dict(tb_cfg.params), "scale_factor": tb_cfg.scale,
                                   "scheduler": SCHEDULER})
    command = "python -m bench tune" + "".join(f" {a}" for a in (argv or []))
    commit, dirty = _git("rev-parse", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    t_start = time.monotonic()
    measured: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)

    tb = Testbed(tb_cfg)
    scen = scenario_mod.load(args.scenario, tb.topo)

    def cost(weights: Mapping[str, float]) -> float:
        key = canonical(weights) if not args.no_dedupe else tuple(sorted(weights.items()))
        if key not in measured:
            if args.max_classes and len(measured) >= args.max_classes:
                measured[key] = {"skipped": True, "measured_with": dict(weights)}
                return math.inf
            name = class_name(key)
            run_dir = out / name
            run_dir.mkdir()
            cfg = replace(base, scheduler_config=dict(weights))
            runner = scenario_mod.ScenarioRunner(tb, scen, run_dir / "background")
            load_before = os.getloadavg()[0]
            wall0 = time.monotonic()
            runner.start()
            try:
                summary, envelope = metered_replay(tb, cfg, MininetLauncher(tb), run_dir)
            finally:
                runner.stop()
            ok = summary["ok"] == summary["requests"] > 0 and not summary["problems"]
            measured[key] = {
                "measured_with": dict(weights), "run_dir": str(run_dir),
                "requests": summary["requests"], "ok": summary["ok"], "failure_reasons": summary["failure_reasons"],
                "ttft_mean_ms": _r(summary["ttft_mean_ms"]), "ttft_p50_ms": _r(summary["ttft_p50_ms"]),
                "ttft_p99_ms": _r(summary["ttft_p99_ms"]),
                "ttft_slo_ms": summary.get("ttft_slo_ms"), "ttft_slo_attainment": _r(summary.get("ttft_slo_attainment"), 4),
                "transfer_mean_ms": _r(summary["transfer_mean_ms"]),
                "switch_cpu_pct_mean": envelope["switch_cpu_pct_mean"],
                "switch_cpu_pct_max": envelope["switch_cpu_pct_max"],
                "within_envelope": envelope["within_envelope"],
                "background_flows_started": runner.started_flows,
                "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
                "wall_s": round(time.monotonic() - wall0, 1),
                "objective_ms": _r(summary["ttft_mean_ms"]) if ok else None,
            }
            m = measured[key]
            print(f"bench tune: {name}: {m['ok']}/{m['requests']} ok, mean TTFT {m['ttft_mean_ms']} ms, "
                  f"p99 {m['ttft_p99_ms']} ms, SLO {m['ttft_slo_attainment']}, switch CPU max "
                  f"{m['switch_cpu_pct_max']}%, load {m['load_avg_1m_after']}, {m['wall_s']} s",
                  file=sys.stderr, flush=True)
        m = measured[key]
        return float(m["objective_ms"]) if m.get("objective_ms") is not None else math.inf

    report = None
    try:
        try:
            report = tb.up()
            print(f"bench tune: fabric up in {report.up_s:.1f} s ({report.datapath}); replays in {out}",
                  file=sys.stderr, flush=True)
            best, table = tune(cost, grid, tuning_window_ms=tuning_ms, evaluation_window_ms=eval_ms)
        finally:
            left = tb.down()
    except (BringUpError, PreflightError, ValueError) as exc:
        print(json.dumps({"bench": "tune", "error": str(exc)}))
        return 1

    rows = []
    for weights, value in table:
        key = canonical(weights) if not args.no_dedupe else tuple(sorted(weights.items()))
        m = measured[key]
        rows.append({"weights": weights, "class": class_name(key), "objective_ms": None if math.isinf(value) else value,
                     **{k: v for k, v in m.items() if k != "objective_ms"}})
    if math.isinf(min(v for _, v in table)):
        print(json.dumps({"bench": "tune", "error": "no combination completed every request", "results": rows}))
        return 1
    result: dict[str, Any] = {
        "bench": "tune",
        "scheduler": SCHEDULER,
        "weights": best,
        "objective": "lowest mean TTFT (ms) over the tuning window's requests; a combination with any failed "
                     "request is excluded; ties: first in grid order",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit, "git_modified_files": [ln[3:] for ln in dirty.splitlines()], "command": command,
        "trace": replay_settings["trace_path"], "trace_sha256": _sha256(replay_settings["trace_path"]),
        "tuning_window_s": [args.start_s, args.start_s + args.duration_s],
        "evaluation_window_s": [args.eval_start_s, args.eval_start_s + args.eval_duration_s],
        "scenario": scen.name, "oracle": "static",
        "replay": {k: v for k, v in base.to_dict().items() if k != "scheduler_config"},
        "testbed": {**tb_cfg.to_json(), "datapath": report.datapath if report else None,
                    "tcp_congestion": report.as_dict().get("tcp_congestion") if report else None},
        "grid": {k: list(v) for k, v in grid.items()},
        "dedupe": "none: every combination replayed" if args.no_dedupe else
                  "combinations equal up to a power-of-two factor make identical decisions and share one replay",
        "replays": sum(1 for m in measured.values() if not m.get("skipped")),
        "skipped_classes": sum(1 for m in measured.values() if m.get("skipped")),
        "results": rows,
        "runtime_s": round(time.monotonic() - t_start, 1),
        "leftovers": left.as_dict(),
    }
    if args.write and not result["skipped_classes"]:
        Path(args.write).write_text(json.dumps(result, indent=2) + "\n")
        result["written_to"] = args.write
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
