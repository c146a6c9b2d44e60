"""``netkv run``, ``simulate``, ``sweep``, ``report``, ``schedulers`` and ``scenarios``: experiments."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import topologies
from fabric.config import ConfigError, TestbedConfig
from fabric.system import require_root
from lab import scenario as scenario_mod
from lab.campaign import AA_SUFFIX, is_campaign, render_campaign, render_pairs, write_campaign
from lab.experiment import (
    DEFAULT_REPLAY,
    DEFAULT_SCENARIO,
    DEFAULT_SCHEDULERS,
    ORDERS,
    ExperimentConfig,
    ExperimentError,
    prepare,
)
from lab.pool import PoolError, pool
from lab.report import render_table, write_report
from lab.engine import DEFAULT_ENGINE, ENGINES, check_jobs
from lab.run import run_experiment
from lab.simulator import SimulatorRefusal
from lab.simulator import check_experiment as check_simulation
from lab.rundir import default_out_dir
from lab.sweep import SWEEPS, Knob, SweepError, plan, render_sweep, run_sweep, write_sweep
from netkv.schedulers import SchedulerLoadError, describe, known, resolve

from .common import CliError, add_testbed_options, config_from_args, install_stop_handlers


def add_parsers(sub: Any) -> None:
    add_run_parsers(sub)
    add_sweep_parser(sub)
    add_report_parser(sub)
    add_pool_parser(sub)


# -- command line ------------------------------------------------------------------------
def add_run_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="replay a trace once per scheduler under scripted congestion and compare",
        description="Bring the fabric up, then for each scheduler: start the scenario's background "
                    "flows, replay the trace window through 64 worker processes that move real KV "
                    "bytes over TCP, and write one record per request. Ends with a comparison "
                    "(comparison.json and plots) in the run directory, beside the full configuration "
                    "(experiment.json) that `netkv run --config` repeats.",
        epilog="Replay settings (--set KEY=VALUE, value as JSON): see `python -m workers.run --help`.")
    add_run_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "simulate", help="the same experiment on the simulator: SimGrid's flow-level network, no root",
        description="Run an experiment as `netkv run` does (the same options, experiment files and run "
                    "directory: records.jsonl per scheduler, comparison.json or the campaign files, read by "
                    "`netkv report`), on SimGrid's flow-level TCP model (LV08) of the topology at its real link "
                    "rates instead of the emulated fabric: the serving model, schedulers, oracle and trace are "
                    "the emulator's, time is simulated. Needs no root. See docs/simulator.md.",
        epilog="Refused in one line: fault events other than link_rate, a platform too large for the memory "
               "here. Replay settings (--set KEY=VALUE, value as JSON): see `python -m workers.run --help`.")
    add_run_options(p)
    add_jobs_option(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("schedulers", help="list the decode schedulers",
                       description="Every registered decode scheduler with its one-line description.")
    p.set_defaults(func=cmd_schedulers)

    p = sub.add_parser("scenarios", help="list the congestion scenarios",
                       description="Scenarios in scenarios/ with their description and flows.")
    p.add_argument("--topology", default="fattree", help="topology to check them against")
    p.set_defaults(func=cmd_scenarios)


def add_jobs_option(p: Any) -> None:
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="simulator only: run N replays at once, each in a process of its own from a platform "
                        "of its own (N times the memory; `netkv simulate` refuses what does not fit). A "
                        "simulated replay comes out the same whatever runs beside it; only its decision_us "
                        "(wall time) feels the neighbours. Default 1")


def add_run_options(p: Any) -> None:
    """The testbed and experiment options `netkv run` and `netkv sweep` share."""
    add_testbed_options(p)
    g = p.add_argument_group("experiment")
    g.add_argument("--experiment", type=Path, metavar="FILE",
                   help="repeat a run: its experiment.json (options given here override it)")
    g.add_argument("--schedulers", help=f"comma-separated (default: {','.join(DEFAULT_SCHEDULERS)}); "
                                        f"`netkv schedulers` lists them")
    g.add_argument("--scenario", help=f"congestion script name or JSON path (default: {DEFAULT_SCENARIO}; "
                                      f"known: {', '.join(scenario_mod.names())})")
    g.add_argument("--trace", help="Mooncake-format JSONL trace (default: traces/mooncake_conversation.jsonl "
                                   "in the repository)")
    g.add_argument("--start-s", type=float, help="window start in the trace, seconds (default 0)")
    g.add_argument("--duration-s", type=float, help="window length, seconds of trace time (default 60)")
    g.add_argument("--rate-multiplier", type=float, help="replay speed-up of arrivals (default 1)")
    g.add_argument("--max-requests", type=int, help="replay at most this many requests of the window")
    g.add_argument("--window-starts-s", metavar="S,S,...",
                   help="a campaign: several disjoint trace windows (comma-separated starts, seconds), each "
                        "replayed by every scheduler; figures get 95%% intervals across windows")
    g.add_argument("--oracle", choices=("static", "telemetry"),
                   help="network cost oracle the schedulers consult (default: telemetry)")
    g.add_argument("--ttft-slo-ms", type=float, help="TTFT SLO for attainment figures")
    g.add_argument("--set", dest="replay_set", action="append", metavar="KEY=VALUE",
                   help="any other replay setting, value as JSON (repeatable)")
    g.add_argument("--variant", dest="variants", action="append", metavar="LABEL=JSON",
                   help="a scheduler label replayed with other replay settings, e.g. "
                        "'netkv_static={\"scheduler\": \"netkv\", \"oracle\": \"static\"}' (repeatable; list "
                        "the label in --schedulers)")
    g.add_argument("--aa", metavar="SCHEDULER",
                   help="A/A: replay SCHEDULER a second time in every window, as SCHEDULER@aa; their paired "
                        "difference is the testbed's own noise floor, reported beside every change")
    g.add_argument("--order", choices=ORDERS,
                   help="the order of the replays within each window: fixed (as listed; default), alternate "
                        "(reversed every other window), random (shuffled per window, from --order-seed)")
    g.add_argument("--order-seed", type=int, help="seed of --order random (default 0)")
    g.add_argument("--out", help="run directory (default: runs/<time>-<scenario>)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")


def experiment_from_args(args: argparse.Namespace) -> ExperimentConfig:
    if args.experiment:
        try:
            exp = ExperimentConfig.from_json(json.loads(args.experiment.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CliError(f"cannot read experiment {args.experiment}: {exc}") from None
        exp.out_dir = ""
        exp.recorded = {}
        if args.config is None:
            base_tb = TestbedConfig.from_json(exp.testbed)
            for f in fields(TestbedConfig):
                if getattr(args, f.name, None) is None:
                    setattr(args, f.name, getattr(base_tb, f.name) if f.name != "params" else
                            [f"{k}={v}" for k, v in base_tb.params.items()] or None)
    else:
        exp = ExperimentConfig(replay=dict(DEFAULT_REPLAY))
    exp.testbed = config_from_args(args).to_json()
    if args.schedulers:
        exp.schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
        # the experiment file's variants of labels not chosen go with them (a --variant below still must be used)
        exp.variants = {k: v for k, v in exp.variants.items() if k in exp.schedulers}
    if args.scenario:
        exp.scenario = args.scenario
    for key, value in (("trace_path", args.trace), ("start_s", args.start_s), ("duration_s", args.duration_s),
                       ("rate_multiplier", args.rate_multiplier), ("max_requests", args.max_requests),
                       ("oracle", args.oracle), ("ttft_slo_ms", args.ttft_slo_ms)):
        if value is not None:
            exp.replay[key] = str(Path(value).resolve()) if key == "trace_path" else value
    for item in args.replay_set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CliError(f"--set {item!r} is not KEY=VALUE")
        try:
            exp.replay[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            exp.replay[key.strip()] = raw
    for item in args.variants or []:
        label, sep, raw = item.partition("=")
        try:
            overrides = json.loads(raw) if sep else None
        except json.JSONDecodeError:
            overrides = None
        if not label or not isinstance(overrides, dict):
            raise CliError(f"--variant {item!r} is not LABEL=JSON-object")
        exp.variants[label.strip()] = overrides
    if args.aa:
        label = args.aa + AA_SUFFIX
        exp.variants[label] = {"scheduler": args.aa}
        if label not in exp.schedulers:
            exp.schedulers.append(label)
    if args.order is not None:
        exp.order = args.order
    if args.order_seed is not None:
        exp.order_seed = args.order_seed
    if args.window_starts_s:
        try:
            exp.window_starts_s = [float(v) for v in args.window_starts_s.split(",") if v.strip()]
        except ValueError:
            raise CliError(f"--window-starts-s {args.window_starts_s!r} is not a comma-separated list of seconds") \
                from None
    if args.out:
        exp.out_dir = str(Path(args.out).resolve())
    return exp


def cmd_run(args: argparse.Namespace) -> int:
    exp = experiment_from_args(args)
    try:
        prepare(exp)  # every check that needs no network, before root is even asked for
    except (scenario_mod.ScenarioError, ConfigError) as exc:
        raise ExperimentError(str(exc)) from None
    require_root()
    install_stop_handlers()
    return _report_result(exp, args, run_experiment(exp, quiet=args.quiet))


def cmd_simulate(args: argparse.Namespace) -> int:
    exp = experiment_from_args(args)
    try:
        tb_cfg, base, scen, _ = prepare(exp)  # the checks `netkv run` makes, then the simulator's own
        check_jobs("simulate", args.jobs)
        check_simulation(exp, base, scen, tb_cfg.validate(), args.jobs)
    except (scenario_mod.ScenarioError, ConfigError, SimulatorRefusal, ValueError) as exc:
        raise ExperimentError(str(exc)) from None
    install_stop_handlers()
    return _report_result(exp, args, run_experiment(exp, quiet=args.quiet, engine="simulate", jobs=args.jobs))


def _report_result(exp: ExperimentConfig, args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.quiet:
        print(json.dumps(result))
        return 0 if result.get("nothing_lost", True) else 1
    if exp.window_starts_s:
        print(render_campaign(result))
        return 0 if result["nothing_lost"] else 1
    print(render_table(result))
    bad = [s for s, m in result.get("schedulers", {}).items() if m.get("problems")]
    return 1 if bad else 0


def cmd_schedulers(args: argparse.Namespace) -> int:
    for name, text in describe().items():
        print(f"{name:22s} {text}")
    for name in known()[len(describe()):]:  # installed entry points of the netkv.schedulers group
        try:
            print(f"{name:22s} {resolve(name).doc}  [entry point]")
        except SchedulerLoadError as exc:
            print(f"{name:22s} (does not load: {exc})")
    print(f"{'sglang-router:<policy>':22s} the real SGLang router picks (cache_aware, power_of_two, round_robin, "
          f"random; docs/schedulers.md)")
    print("or any 'package.module:Class' that subclasses netkv.schedulers.Scheduler (docs/schedulers.md)")
    return 0


def cmd_scenarios(args: argparse.Namespace) -> int:
    for name in scenario_mod.names():
        try:  # against the fabric it is written for, unless another topology was asked for
            params = scenario_mod.written_for(name) if args.topology == topologies.DEFAULT_TOPOLOGY else {}
            topo = topologies.build(args.topology, params)
            scen = scenario_mod.load(name, topo)
        except scenario_mod.ScenarioError as exc:
            print(f"{name:16s} (does not fit {args.topology}: {exc})")
            continue
        events = f", {len(scen.events)} fault events" if scen.events else ""
        print(f"{name:16s} {len(scen.flows)} flows{events}, {scen.load_mbps_hops(topo, TestbedConfig().scale):.0f} "
              f"Mbit/s x hops at the default scale: {scen.description}")
    return 0


# -- command line ------------------------------------------------------------------------
def add_sweep_parser(sub: Any) -> None:
    lines = "\n".join(f"  {k.name:10s} {k.section}.{k.key} over {', '.join(map(str, k.values))}: {k.help}"
                      for k in SWEEPS.values())
    p = sub.add_parser(
        "sweep", help="run a named sweep over one knob, every scheduler at every point",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run one knob over several values; at every point, every scheduler replays the same "
                    "trace windows on the same fabric under the same scenario (an ordinary campaign per "
                    "point). Writes sweep.json and sweep.png (95% intervals across windows; hollow points "
                    "had a replay outside the emulator's envelope).\n\nsweeps:\n" + lines)
    p.add_argument("name", choices=sorted(SWEEPS), help="the knob to sweep")
    p.add_argument("--values", help="comma-separated values instead of the sweep's defaults")
    p.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                   help="emulate: the emulated fabric (root; default); simulate: SimGrid's flow-level model, as "
                        "`netkv simulate` runs it (no root, docs/simulator.md)")
    add_run_options(p)
    add_jobs_option(p)
    p.set_defaults(func=cmd_sweep)


def parse_values(knob: Knob, text: str | None) -> list[Any]:
    if text is None:
        return list(knob.values)
    try:
        values = [knob.parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"--values {text!r}: not a comma-separated list for {knob.key}") from None
    if not values:
        raise SweepError("--values is empty")
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise SweepError(f"--values {text!r}: values must be finite")
    return values


def cmd_sweep(args: argparse.Namespace) -> int:
    knob = SWEEPS[args.name]
    values = parse_values(knob, args.values)
    base = experiment_from_args(args)
    keep = bool(args.schedulers)
    out = Path(args.out).resolve() if args.out else default_out_dir(f"sweep-{args.name}")
    base.out_dir = ""
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"sweep directory {out} exists and is not empty; choose another --out")
    points = plan(base, knob, values, out, keep)  # every point checked before root is asked for or anything is built
    try:
        check_jobs(args.engine, args.jobs)
    except ValueError as exc:
        raise SweepError(str(exc)) from None
    if args.engine == "emulate":
        require_root()
    else:  # and every point as `netkv simulate` checks it
        for value, point in zip(values, points):
            try:
                tb_cfg, point_base, scen, _ = prepare(point)
                check_simulation(point, point_base, scen, tb_cfg.validate(), args.jobs)
            except (scenario_mod.ScenarioError, ConfigError, SimulatorRefusal) as exc:
                raise SweepError(f"{knob.key}={value}: {exc}") from None
    install_stop_handlers()
    result = run_sweep(args.name, base, values, out, quiet=args.quiet, keep_schedulers=keep, engine=args.engine,
                       jobs=args.jobs)
    print(json.dumps(result) if args.quiet else render_sweep(result))
    return 0 if result["nothing_lost"] else 1


def add_report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="remake a run's, campaign's or sweep's figures and plots from its files",
                       description="Read a run directory (experiment.json, <scheduler>/records.jsonl) and "
                                   "write comparison.json, comparison.png and utilisation.png beside them; "
                                   "of a campaign (several windows) also campaign.json and campaign.png with "
                                   "95%% intervals across windows and the paper's figures beside ours; of a "
                                   "sweep, sweep.json and sweep.png. Needs no root.")
    p.add_argument("run_dir", type=Path, help="a directory made by `netkv run` or `netkv sweep`")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON instead of a table")
    p.add_argument("--pairs", metavar="A:B,C:D",
                   help="a campaign: also print these paired changes (A against B), headline and every-window, with "
                        "the A/A noise floor beside them, e.g. netkv_static:dynamo_decode,netkv:netkv_static")
    p.set_defaults(func=cmd_report)


def add_pool_parser(sub: Any) -> None:
    p = sub.add_parser("pool", help="read several campaigns of one experiment, on disjoint windows, as one",
                       description="Make OUT a campaign whose windows are the given campaigns' windows (linked, "
                                   "not copied), then report it as `netkv report OUT` does: changes paired by "
                                   "window over every window. The campaigns must be the same experiment "
                                   "(schedulers, variants, scenario, replay settings, fabric; only the prefix, "
                                   "ports and replay order may differ) on windows that do not overlap. Needs "
                                   "no root.")
    p.add_argument("out", type=Path, help="the pooled campaign's directory (must not exist)")
    p.add_argument("runs", type=Path, nargs="+", metavar="CAMPAIGN", help="two or more campaign directories")
    p.add_argument("--json", action="store_true", help="print the campaign as JSON instead of a table")
    p.add_argument("--pairs", metavar="A:B,C:D", help="also print these paired changes, as `netkv report --pairs`")
    p.set_defaults(func=cmd_pool)


def cmd_pool(args: argparse.Namespace) -> int:
    try:
        pool(args.out, args.runs)
    except PoolError as exc:
        raise CliError(str(exc)) from None
    args.run_dir = args.out
    return cmd_report(args)


def cmd_report(args: argparse.Namespace) -> int:
    if (args.run_dir / "sweep.json").is_file() or (args.run_dir / "sweep-plan.json").is_file():
        result = write_sweep(args.run_dir)
        print(json.dumps(result) if args.json else render_sweep(result))
        return 0
    if not (args.run_dir / "experiment.json").is_file():
        raise CliError(f"{args.run_dir} is not a run directory (no experiment.json)")
    if is_campaign(args.run_dir):
        campaign = write_campaign(args.run_dir)
        print(json.dumps(campaign) if args.json else render_campaign(campaign))
        if args.pairs:
            pairs = [tuple(x.split(":", 1)) for x in args.pairs.split(",") if x.strip()]
            bad = [p for p in pairs if len(p) != 2 or any(n not in campaign["schedulers_order"] for n in p)]
            if bad:
                raise CliError(f"--pairs {args.pairs!r}: each pair is A:B of {', '.join(campaign['schedulers_order'])}")
            print(render_pairs(campaign, pairs))  # type: ignore[arg-type]
        return 0
    comparison = write_report(args.run_dir)
    print(json.dumps(comparison) if args.json else render_table(comparison))
    return 0
