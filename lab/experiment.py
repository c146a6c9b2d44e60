"""An experiment: which schedulers replay which trace windows, under which
congestion, on which fabric; and every check that can be made before a
network is built (:func:`prepare`).

``ExperimentConfig`` is what ``experiment.json`` holds, so a run directory
repeats itself (``netkv run --experiment DIR/experiment.json``).  Running it
is :mod:`lab.run`; the defaults of ``netkv run`` are here.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fabric.config import TestbedConfig
from lab import scenario as scenario_mod
from lab.faults import FaultError, check_workers
from lab.rundir import default_out_dir
from netkv import perfmodel
from netkv.placement import PlacementError, make_placement
from netkv.schedulers import SchedulerLoadError, create, resolve
from netkv.schedulers.baselines import tuning_window_s
from netkv.serving.config import ReplayConfig, ReplayConfigError
from netkv.slo import FLAT_TTFT_SLO_MS
from netkv.traces import TraceError

DEFAULT_SCHEDULERS = ("round_robin", "tuned_cache_load", "netkv")


DEFAULT_SCENARIO = "core-hotspot"


ORDERS = ("fixed", "alternate", "random")
# what a variant may not change: the window every scheduler of the experiment replays
VARIANT_FIXED = frozenset({"trace_path", "start_s", "duration_s", "rate_multiplier", "max_requests",
                           "on_trace_error", "context_factor", "model_context"})


class ExperimentError(RuntimeError):
    """The experiment cannot run as configured; one clear line."""


@dataclass
class ExperimentConfig:
    description: str = field(default="", metadata={"help": "what the experiment is for, in a sentence or two"})
    schedulers: list[str] = field(default_factory=lambda: list(DEFAULT_SCHEDULERS), metadata={
        "help": "decode schedulers to compare, each replayed once on the same fabric"})
    scenario: str = field(default=DEFAULT_SCENARIO, metadata={
        "help": "congestion script: a name in scenarios/ or a path to a JSON file"})
    testbed: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "TestbedConfig fields (topology, scale, ...)"})
    replay: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "netkv.serving.config.ReplayConfig fields (trace_path, start_s, duration_s, rate_multiplier, ...)"})
    window_starts_s: list[float] = field(default_factory=list, metadata={
        "help": "several disjoint trace windows, each replayed by every scheduler on the same fabric "
                "(a campaign: one sub-run per window, figures with 95% intervals across windows); "
                "empty: the one window replay.start_s"})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "labels in 'schedulers' that replay with other replay settings, {label: {replay key: value}}; "
                "'scheduler' is the scheduler a label runs (default: the label itself). An A/A copy: "
                "{'netkv@aa': {'scheduler': 'netkv'}}; an ablation: {'netkv_static': {'scheduler': 'netkv', "
                "'oracle': 'static'}}"})
    order: str = field(default="fixed", metadata={
        "help": "the order the schedulers replay in within each window: 'fixed' (as listed), 'alternate' "
                "(reversed in every other window), 'random' (shuffled per window from order_seed); each "
                "window's experiment.json records the order it ran in"})
    order_seed: int = field(default=0, metadata={"help": "seed of the 'random' order"})
    out_dir: str = field(default="", metadata={"help": "run directory (default runs/<time>-<scenario>)"})
    recorded: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "what produced the run (versions, git commit), written by the run; ignored when repeated"})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise ExperimentError("experiment configuration must be a JSON object")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(data) - known, key=str)
        if bad:
            raise ExperimentError(f"unknown experiment setting {bad[0]!r}; known: {', '.join(sorted(known))}")
        for name, kind, label in (("scenario", str, "a string"), ("out_dir", str, "a string"),
                                  ("description", str, "a string"),
                                  ("testbed", dict, "a JSON object"), ("replay", dict, "a JSON object"),
                                  ("recorded", dict, "a JSON object")):
            if name in data and not isinstance(data[name], kind):
                raise ExperimentError(f"experiment setting {name!r} must be {label}, got {data[name]!r}")
        schedulers = data.get("schedulers", [])
        if not isinstance(schedulers, list) or not all(isinstance(s, str) for s in schedulers):
            raise ExperimentError(f"experiment setting 'schedulers' must be a list of names, got {schedulers!r}")
        variants = data.get("variants", {})
        if not isinstance(variants, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                     for k, v in variants.items()):
            raise ExperimentError(f"experiment setting 'variants' must map labels to JSON objects, got {variants!r}")
        if data.get("order", "fixed") not in ORDERS:
            raise ExperimentError(f"experiment setting 'order' must be one of {', '.join(ORDERS)}, "
                                  f"got {data.get('order')!r}")
        seed = data.get("order_seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ExperimentError(f"experiment setting 'order_seed' must be a whole number >= 0, got {seed!r}")
        return cls(**data)

    def replay_order(self, window_index: int) -> list[str]:
        """The labels in the order they replay in window ``window_index``."""
        labels = list(self.schedulers)
        if self.order == "alternate" and window_index % 2 == 1:
            labels.reverse()
        elif self.order == "random":
            random.Random(self.order_seed * 1_000_003 + window_index).shuffle(labels)
        return labels

    def replay_config(self, base: ReplayConfig, label: str) -> ReplayConfig:
        """The replay configuration of one label: the base with the label's
        scheduler and, for a variant, its settings."""
        overrides = dict(self.variants.get(label, {}))
        scheduler = overrides.pop("scheduler", label)
        return ReplayConfig.from_dict({**base.to_dict(), **overrides, "scheduler": scheduler})


def _check_windows(exp: ExperimentConfig, base: Any) -> list[float]:
    """The campaign's window starts, checked: finite, >= 0, a window length
    set, pairwise disjoint in trace time, and none overlapping the window the
    tuned baseline was tuned on (when the trace is the one it was tuned on)."""
    starts = exp.window_starts_s
    if not isinstance(starts, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) and v >= 0 for v in starts):
        raise ExperimentError(f"window_starts_s must be a list of finite numbers >= 0 (seconds), got {starts!r}")
    if not starts:
        return []
    if base.duration_s is None:
        raise ExperimentError("window_starts_s needs a window length: set replay duration_s")
    length = float(base.duration_s)
    ordered = sorted(float(v) for v in starts)
    for a, b in zip(ordered, ordered[1:]):
        if b < a + length:
            raise ExperimentError(f"windows starting at {a:g} s and {b:g} s overlap (each is {length:g} s long)")
    tuned = tuning_window_s(Path(base.trace_path))
    if tuned is not None:
        for a in ordered:
            if a < tuned[1] and tuned[0] < a + length:
                raise ExperimentError(f"the window starting at {a:g} s overlaps the tuning window "
                                      f"[{tuned[0]:g}, {tuned[1]:g}) s of tuned_cache_load; choose another")
    return [float(v) for v in starts]


def prepare(exp: ExperimentConfig) -> tuple[TestbedConfig, Any, scenario_mod.Scenario, Path]:
    """Check everything that can be checked before a network is built."""

    tb_cfg = TestbedConfig.from_json(exp.testbed)
    topo = tb_cfg.validate()
    if not exp.schedulers:
        raise ExperimentError("give at least one scheduler")
    for name in exp.schedulers:
        scheduler = exp.variants.get(name, {}).get("scheduler", name)
        try:
            resolve(str(scheduler))
        except SchedulerLoadError as exc:
            raise ExperimentError(f"variant {name!r}: {exc}" if name in exp.variants else str(exc)) from None
    if len(set(exp.schedulers)) != len(exp.schedulers):
        raise ExperimentError("a scheduler is listed twice")
    unused = sorted(set(exp.variants) - set(exp.schedulers))
    if unused:
        raise ExperimentError(f"variant {unused[0]!r} is not among the schedulers {exp.schedulers}")
    for label, overrides in exp.variants.items():
        fixed = sorted(set(overrides) & (VARIANT_FIXED | {"topology", "topology_params", "scale_factor"}))
        if fixed:
            raise ExperimentError(f"variant {label!r} may not set {fixed[0]!r}: every scheduler of an experiment "
                                  f"replays the same windows on the same fabric")
    managed = {"topology", "topology_params", "scale_factor", "scheduler"}
    overlap = sorted(set(exp.replay) & managed)
    if overlap:
        raise ExperimentError(f"replay setting {overlap[0]!r} is set by the experiment itself "
                              f"(use the testbed options or --schedulers)")
    try:
        base = ReplayConfig.from_dict({**exp.replay, "topology": tb_cfg.topology,
                                       "topology_params": dict(tb_cfg.params),
                                       "scale_factor": tb_cfg.scale, "scheduler": exp.schedulers[0]})
    except ReplayConfigError as exc:
        raise ExperimentError(str(exc)) from None
    # The instances must fit the fabric (a TP model needs servers that hold whole instances).
    make_placement(topo, base.placement, tp=perfmodel.build(base.model, base.gpu, base.perf_overrides).tp)
    for label in exp.schedulers:
        try:
            cfg = exp.replay_config(base, label)
        except ReplayConfigError as exc:
            raise ExperimentError(f"variant {label!r}: {exc}") from None
        perf = perfmodel.build(cfg.model, cfg.gpu, cfg.perf_overrides)
        try:  # the scheduler's own settings, checked by building it once
            create(cfg.scheduler, cfg.scheduler_config, seed=cfg.seed, kv_bytes_per_token=perf.kv_bytes_per_token)
        except ValueError as exc:
            raise ExperimentError(f"{label}: {exc}") from None
        try:  # a variant's instances must fit the fabric as the base's do
            make_placement(topo, cfg.placement, tp=perf.tp)
        except PlacementError as exc:
            raise ExperimentError(f"{label}: {exc}") from None
    if not Path(base.trace_path).is_file():
        raise ExperimentError(f"trace not found: {base.trace_path}")
    try:  # a malformed line or an empty window is found here, before any network exists
        window = base.window()
    except TraceError as exc:
        raise ExperimentError(str(exc)) from None
    if not window.requests:
        end = "end" if base.duration_s is None else f"{base.start_s + base.duration_s:g}"
        raise ExperimentError(f"the trace window [{base.start_s:g}, {end}) s of {base.trace_path} "
                              f"holds no request")
    for start in _check_windows(exp, base):
        try:
            if not replace(base, start_s=start).window().requests:
                raise ExperimentError(f"the trace window [{start:g}, {start + float(base.duration_s or 0):g}) s "
                                      f"of {base.trace_path} holds no request")
        except TraceError as exc:
            raise ExperimentError(str(exc)) from None
    scen = scenario_mod.load(exp.scenario, topo)
    if scen.events:
        for label in exp.schedulers:  # every label's workers, variants' placements included
            cfg = exp.replay_config(base, label)
            try:
                check_workers(scen.events, make_placement(topo, cfg.placement).hosts, f"scenario {scen.name}")
            except (FaultError, PlacementError) as exc:
                raise ExperimentError(str(exc)) from None
    out = Path(exp.out_dir) if exp.out_dir else default_out_dir(scen.name)
    if out.exists() and any(out.iterdir()):
        raise ExperimentError(f"run directory {out} exists and is not empty; choose another --out")
    return tb_cfg, base, scen, out


DEFAULT_REPLAY = {"oracle": "telemetry", "duration_s": 60.0, "rate_multiplier": 1.0, "ttft_slo_ms": FLAT_TTFT_SLO_MS}
