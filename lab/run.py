"""``netkv run``'s work: bring the fabric up once, replay every window with
every scheduler, bring it down, and write the comparison or the campaign.

One run directory holds everything needed to read and to repeat it::

    runs/<time>-<scenario>/
      experiment.json      the full configuration (rerun: netkv run --experiment this)
      scenario.json        the congestion script as it was used
      testbed.json         the fabric's configuration and bring-up report
      <scheduler>/         one replay: config.json, records.jsonl, summary.json,
                           envelope.json, worker and iperf3 logs
      comparison.json      metrics per scheduler, read back from the records
      *.png                plots made from comparison.json and the records

With several windows (a campaign) each window is such a directory
(``w<i>-<start>s/``) and ``campaign.json`` sits above them.  The fabric is
brought up once and kept for every scheduler; workers and the background
flows are started afresh for each replay so that every scheduler meets the
same congestion from the same start.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from lab import scenario as scenario_mod
from lab.campaign import write_campaign
from lab.engine import DEFAULT_ENGINE, ENGINES, Engine, check_jobs
from lab.experiment import ExperimentConfig, ExperimentError, prepare
from lab.report import write_report
from lab.rundir import provenance, window_dir_name
from netkv.schedulers import provenance as scheduler_provenance
from netkv.serving.config import ReplayConfig

# an interrupted run waits this long for the replays running to end by themselves (Ctrl-C reaches
# their processes too, and each then writes a record for every request it holds), then ends them
REPLAY_GRACE_S = 5.0


def run_experiment(exp: ExperimentConfig, *, quiet: bool = False, engine: str = DEFAULT_ENGINE,
                   jobs: int = 1) -> dict[str, Any]:
    """Bring the engine up once (the emulated fabric by default), replay every
    window with every scheduler, bring it down, and write the comparison (one
    window) or the campaign (several windows: one ordinary run directory per
    window, each repeatable alone, and campaign.json across them).  ``jobs``:
    replays at once, on an engine that can (the simulator: its replays are
    independent, and each comes out the same whatever runs beside it)."""

    if engine not in ENGINES:
        raise ExperimentError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    try:
        check_jobs(engine, jobs)
    except ValueError as exc:
        raise ExperimentError(str(exc)) from None
    tb_cfg, base, scen, out = prepare(exp)
    out.mkdir(parents=True, exist_ok=True)
    exp.out_dir = str(out)
    exp.recorded = provenance()
    # where each scheduler's code came from (a scheduler from outside the repository: its version and hash)
    exp.recorded["schedulers"] = {label: scheduler_provenance(exp.replay_config(base, label).scheduler)
                                  for label in exp.schedulers}
    (out / "experiment.json").write_text(json.dumps(exp.to_json(), indent=2) + "\n")
    (out / "scenario.json").write_text(json.dumps(scen.to_json(), indent=2) + "\n")

    def say(text: str) -> None:
        if not quiet:
            print(f"netkv: {text}", flush=True)

    # each window's own experiment: repeatable alone, in the order its replays ran
    windows = [(out / window_dir_name(i, start),
                replace(exp, window_starts_s=[], out_dir=str(out / window_dir_name(i, start)),
                        replay={**exp.replay, "start_s": start}, schedulers=exp.replay_order(i), order="fixed"),
                replace(base, start_s=start))
               for i, start in enumerate(exp.window_starts_s)] or [(out, exp, base)]
    eng = ENGINES[engine](tb_cfg, jobs)
    load_bg = scen.load_mbps_hops(eng.topology, tb_cfg.scale)
    say(f"run directory {out}")
    say(f"scenario {scen.name}: {len(scen.flows)} background flows"
        + (f", {load_bg:.0f} Mbit/s x hops on the emulator when all run" if engine == "emulate" else ""))
    try:
        bringup = json.dumps(eng.up(), indent=2, default=str) + "\n"
        for line in eng.describe():
            say(line)
        replays: list[tuple[ExperimentConfig, str, ReplayConfig, Path]] = []
        for k, (w_dir, w_exp, w_base) in enumerate(windows):
            if w_dir != out:
                say(f"window {k + 1}/{len(windows)}: trace [{w_base.start_s:g}, "
                    f"{w_base.start_s + float(w_base.duration_s or 0):g}) s -> {w_dir.name}/")
                w_dir.mkdir()
                (w_dir / "experiment.json").write_text(json.dumps(w_exp.to_json(), indent=2) + "\n")
                (w_dir / "scenario.json").write_text(json.dumps(scen.to_json(), indent=2) + "\n")
            (w_dir / "testbed.json").write_text(bringup)
            window = [(w_exp, name, w_base, w_dir) for name in w_exp.replay_order(0)]
            if jobs == 1:
                for replay in window:
                    _replay_one(eng, *replay, scen, say)
            else:
                replays += window
        if replays:
            _replay_at_once(eng, replays, scen, say, jobs, prefix=len(windows) > 1)
    finally:
        eng.down()
    if len(windows) == 1 and windows[0][0] == out:
        comparison = write_report(out)
        say(f"comparison: {out / 'comparison.json'}; plots: {', '.join(p.name for p in sorted(out.glob('*.png')))}")
        return comparison
    campaign = write_campaign(out)
    say(f"campaign: {out / 'campaign.json'}; plots: {', '.join(p.name for p in sorted(out.glob('*.png')))}")
    return campaign


def _replay_one(eng: Engine, exp: ExperimentConfig, name: str, base: ReplayConfig, out: Path,
                scen: scenario_mod.Scenario, say: Callable[[str], None], tag: str = "") -> None:
    """One scheduler (label) of one window on the running engine, with the
    scenario's background flows started afresh; ``tag`` heads its lines (the
    window's, when replays of several run at once)."""
    cfg = exp.replay_config(base, name)
    run_dir = out / name
    run_dir.mkdir()
    say(f"{tag}replaying with {name} ...")
    summary, envelope = eng.replay(cfg, scen, run_dir)
    name = tag + name
    flag = "" if envelope["within_envelope"] is not False else "  [OUTSIDE the emulator's envelope]"
    head = (f"{name}: {summary['ok']}/{summary['requests']} ok, mean TTFT "
            f"{_fmt(summary.get('ttft_mean_ms'))} ms, p99 {_fmt(summary.get('ttft_p99_ms'))} ms; ")
    if envelope.get("engine") == "simulate":
        say(head + f"{_fmt(envelope.get('simulated_s'))} s simulated in {_fmt(envelope.get('wall_s'))} s")
    else:
        say(head + f"busiest switch process p95 {_fmt(envelope['switch_cpu_pct_p95'])}% of a core, machine "
            f"p95 {_fmt(envelope['machine_busy_pct_p95'])}% busy{flag}")
    if envelope.get("limiting_resource"):
        say(f"{name}: the emulator ran short of: {envelope['limiting_resource']}")
    if scen.events:
        bad = [r for r in envelope.get("fault_events", []) if not str(r.get("outcome", "")).startswith("ok")]
        say(f"{name}: {len(scen.events)} fault events ({run_dir / 'events.jsonl'})"
            + (f"; {len(bad)} did not go as planned: {bad[0].get('outcome')}" if bad else ""))


def _replay_at_once(eng: Engine, replays: list[tuple[ExperimentConfig, str, ReplayConfig, Path]],
                    scen: scenario_mod.Scenario, say: Callable[[str], None], jobs: int, prefix: bool) -> None:
    """Every replay of the experiment, ``jobs`` at a time, in the order of
    the list (window by window).  A replay that fails fails the run, as it
    does one at a time; those running then end first (each writes its
    records), those not started are not."""
    lock = threading.Lock()

    def said(text: str) -> None:
        with lock:
            say(text)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="netkv-replay")
    futures = [pool.submit(_replay_one, eng, w_exp, name, base, w_dir, scen, said,
                           f"{w_dir.name}/" if prefix else "")
               for w_exp, name, base, w_dir in replays]
    try:
        for future in futures:
            future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        wait([f for f in futures if f.running()], timeout=REPLAY_GRACE_S)
        raise
    pool.shutdown()


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"
