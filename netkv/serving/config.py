"""The configuration of one replay: which trace window, which scheduler, which
model and fabric, and every setting of the serving model.

Both engines read it (the emulator's worker processes and any engine that
drives :mod:`netkv.serving` in process); it is what a replay directory's
``config.json`` holds, so a replay repeats from it alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from netkv import perfmodel
from netkv.checks import is_finite_number, unknown_key_complaint
from netkv.placement import DEFAULT_PLACEMENT
from netkv.serving.prefill import PREFILL_POLICIES
from netkv.slo import SloConfig, SloError
from netkv.traces import DEFAULT_TRACE as _DEFAULT_TRACE_PATH
from netkv.traces import MAX_CONTEXT_FACTOR, MAX_REPLICAS, ON_ERROR_CHOICES, TraceLoad, load_trace

DEFAULT_TRACE = str(_DEFAULT_TRACE_PATH)
# Real link rates and KV payload bytes are both divided by this on the emulated
# fabric, so that transfer times keep their real values (docs/design.md, "Scale
# factor").  The one default: the testbed's `scale` reads it from here.
DEFAULT_SCALE = 40_000.0


ORACLES = ("static", "telemetry")
MODEL_CONTEXT = ("enforce", "ignore")


DECISION_PRIORITIES = ("realtime", "normal")


def wire_bytes(real_bytes: int, scale: float) -> int:
    """Bytes put on the emulated wire for ``real_bytes`` of KV: divided by the
    scale factor, rounded up (a non-empty payload never becomes empty)."""
    return math.ceil(real_bytes / scale)


def emulated_mbps(rate_gbps: float, scale: float) -> float:
    """Emulated link rate in Mbit/s for a real rate in Gbit/s (the same scale
    factor as :func:`wire_bytes`)."""
    return rate_gbps * 1000.0 / scale


class ReplayConfigError(ValueError):
    """A replay configuration value is missing, unknown or out of range."""


def _f(default: Any, help: str, unit: str = "") -> Any:
    meta = {"help": help, "unit": unit}
    if isinstance(default, (dict, list)):
        value = default
        return field(default_factory=lambda: json.loads(json.dumps(value)), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ReplayConfig:
    trace_path: str = _f(DEFAULT_TRACE, "Mooncake-format JSONL trace to replay", "path")
    start_s: float = _f(0.0, "window start, offset into the trace", "s")
    duration_s: float | None = _f(60.0, "window length (null: to the end of the trace)", "s")
    rate_multiplier: float = _f(1.0, "replay speed: 2 halves every inter-arrival gap (twice the request rate)", "x")
    max_requests: int | None = _f(None, "replay at most this many requests of the window (null: all)", "requests")
    on_trace_error: str = _f("raise", "malformed trace line: 'raise' stops, 'skip' leaves it out and lists it", "")
    context_factor: int = _f(1, "context-length scaling: every prompt is k times longer, each prefix block "
                                "becomes k blocks (sharing kept), arrivals and outputs unchanged; whole number", "x")
    trace_replicas: int = _f(1, "copies of the trace replayed at once, each shifted by 1/n of the trace's span "
                                "and wrapped, its prefixes its own: n times the load for n times the GPUs "
                                "(netkv.traces); whole number", "x")
    topology: str = _f("fattree", "topology name in topologies.catalog", "")
    topology_params: dict[str, Any] = _f({}, "topology builder parameters", "")
    placement: dict[str, Any] = _f(dict(DEFAULT_PLACEMENT), "prefill/decode roles (netkv.placement)", "")
    scheduler: str = _f("netkv", "decode scheduler under test (netkv.schedulers)", "")
    scheduler_config: dict[str, Any] = _f({}, "the scheduler's configuration keys", "")
    oracle: str = _f("static", "network oracle: 'static' (nominal rates) or 'telemetry' (needs a source)", "")
    telemetry_delay_ms: float = _f(0.0, "telemetry oracle only: read every link sample this much older than "
                                        "the latest (a stale oracle, to study staleness)", "ms")
    prefill_policy: str = _f("cache_load", "prefill chooser policy (netkv.serving.prefill)", "")
    model: str = _f(perfmodel.DEFAULT_MODEL, "model in netkv.perfmodel.MODELS", "")
    model_context: str = _f("enforce", "'enforce': a request longer (input + output) than the model's context "
                                       "fails with that reason; 'ignore': served anyway (a synthetic stress point "
                                       "that uses a model's KV size at lengths it cannot serve)", "")
    gpu: str = _f(perfmodel.DEFAULT_GPU, "GPU in netkv.perfmodel.GPUS", "")
    perf_overrides: dict[str, Any] = _f({}, "perf-model overrides: its assumptions and the tensor-parallel degree tp "
                                          "(netkv.perfmodel.PERF_OVERRIDE_KEYS)", "")
    decode_max_batch: int = _f(128, "requests one decode instance decodes together at most", "requests")
    decode_max_queue: int = _f(64, "requests waiting at one decode instance that the scheduler allows", "requests")
    scale_factor: float = _f(DEFAULT_SCALE, "emulated link rates and KV payload bytes are divided by this", "x")
    drain_timeout_s: float = _f(120.0, "after the last arrival, wait this long before failing unfinished requests", "s")
    startup_timeout_s: float = _f(30.0, "time allowed for every worker to connect", "s")
    ttft_slo_ms: float | None = _f(None, "TTFT SLO for the summary's attainment figure (null: none)", "ms")
    slo: dict[str, Any] = _f({}, "settings of the summary's SLO figures: netkv.slo.SloConfig keys (TTFT curve "
                                 "thresholds, length-aware TTFT, TBT); {}: the documented defaults", "")
    seed: int = _f(0, "seed for randomised schedulers", "")
    decision_priority: str = _f("realtime", "CPU priority of each decode decision: 'realtime' runs it at SCHED_FIFO "
                                            "(the router's own core, not the fabric's; needs root, else normal, "
                                            "and the summary says so), 'normal' at the frontend's priority", "")

    def __post_init__(self) -> None:
        self.validate()

    # -- checking ------------------------------------------------------------
    def validate(self) -> None:
        def num(name: str, lo: float, hi: float, *, integer: bool = False, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if not ok_type or not is_finite_number(value) or not lo <= value <= hi:
                kind = "whole number" if integer else "number"
                raise ReplayConfigError(f"{name} must be a {kind} in [{lo:g}, {hi:g}], got {value!r}")

        num("start_s", 0, 1e9)
        num("duration_s", 1e-3, 1e9, optional=True)
        num("rate_multiplier", 1e-3, 1e6)
        num("max_requests", 1, 1e9, integer=True, optional=True)
        num("context_factor", 1, MAX_CONTEXT_FACTOR, integer=True)
        num("trace_replicas", 1, MAX_REPLICAS, integer=True)
        num("decode_max_batch", 1, 4096, integer=True)
        num("decode_max_queue", 0, 1e6, integer=True)
        num("scale_factor", 1, 1e9)
        num("drain_timeout_s", 0, 86400)
        num("startup_timeout_s", 1, 3600)
        num("ttft_slo_ms", 1e-3, 1e9, optional=True)
        num("seed", 0, 2**63, integer=True)
        num("telemetry_delay_ms", 0, 3.6e6)
        if self.telemetry_delay_ms and self.oracle != "telemetry":
            raise ReplayConfigError("telemetry_delay_ms needs oracle 'telemetry'")
        for name, allowed in (("on_trace_error", ON_ERROR_CHOICES), ("oracle", ORACLES),
                              ("prefill_policy", PREFILL_POLICIES), ("model", tuple(perfmodel.MODELS)),
                              ("decision_priority", DECISION_PRIORITIES), ("model_context", MODEL_CONTEXT),
                              ("gpu", tuple(perfmodel.GPUS))):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ReplayConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("trace_path", "topology", "scheduler"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ReplayConfigError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("topology_params", "placement", "scheduler_config", "perf_overrides", "slo"):
            if not isinstance(getattr(self, name), dict):
                raise ReplayConfigError(f"{name} must be a JSON object, got {getattr(self, name)!r}")
        try:
            perfmodel.build(self.model, self.gpu, self.perf_overrides)
        except perfmodel.PerfModelError as exc:
            raise ReplayConfigError(str(exc)) from None
        try:
            SloConfig.from_dict(self.slo)
        except SloError as exc:
            raise ReplayConfigError(f"slo: {exc}") from None

    # -- (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReplayConfig":
        if not isinstance(data, Mapping):
            raise ReplayConfigError(f"replay config must be a JSON object, got {type(data).__name__}")
        complaint = unknown_key_complaint(data, (f.name for f in fields(cls)), "replay config key")
        if complaint:
            raise ReplayConfigError(complaint)
        return cls(**dict(data))

    @classmethod
    def load(cls, path: str | Path) -> "ReplayConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ReplayConfigError(f"cannot read replay config {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ReplayConfigError(f"replay config {path} must be a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def window(self) -> TraceLoad:
        """The requests this replay takes from its trace (window, rate, limit,
        context factor), as the driver reads them.  Raises netkv.traces.TraceError."""
        return load_trace(self.trace_path, start_s=self.start_s, duration_s=self.duration_s,
                          rate_multiplier=self.rate_multiplier, on_error=self.on_trace_error,
                          max_requests=self.max_requests, context_factor=self.context_factor,
                          replicas=self.trace_replicas)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def help_text(cls) -> str:
        lines = []
        defaults = cls().to_dict()
        for f in fields(cls):
            default = defaults[f.name]
            unit = f" [{f.metadata['unit']}]" if f.metadata.get("unit") else ""
            lines.append(f"  {f.name}{unit} (default {json.dumps(default)}): {f.metadata['help']}")
        return "\n".join(lines)
