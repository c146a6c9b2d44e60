"""Fuzz tests (hypothesis) of everything that parses outside input: trace lines and
files, scenario files, experiment and replay configurations.  Bad input must end
in the documented exception type with a one-line message (or, for trace lines
with on_error="skip", a listed skip), never in another exception."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import topologies
from fabric.config import ConfigError, TestbedConfig
from lab import scenario as scenario_mod
from lab.experiment import ExperimentConfig, ExperimentError
from netkv.serving.config import ReplayConfig, ReplayConfigError
from netkv.traces import TraceError, iter_trace, load_trace, parse_line

TOPO = topologies.build("tiny")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-like values, with the awkward ones over-represented: huge and negative integers,
# NaN and infinities (Python's json writes and reads them), unicode, nesting.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-10, 10), st.integers(-(10**30), 10**30), st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308]),
    st.text(max_size=12), st.sampled_from(["", "g0", "g1", "tcp", "raise", "skip", "netkv", "\u00e9\u4e2d\ud83d\ude00"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert text and "\n" not in text, repr(text)


# -- traces ------------------------------------------------------------------------------------

TRACE_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


@st.composite
def trace_objects(draw: Any) -> Any:
    """Mostly near-valid trace objects with one or more fields replaced by junk."""
    n = draw(st.integers(1, 3000))
    obj: dict[str, Any] = {"timestamp": draw(st.floats(0, 1e7)), "input_length": n,
                           "output_length": draw(st.integers(1, 500)),
                           "hash_ids": list(range(math.ceil(n / 512)))}
    for key in draw(st.lists(st.sampled_from(TRACE_KEYS + ("extra",)), max_size=3)):
        if draw(st.booleans()):
            obj[key] = draw(json_values)
        else:
            obj.pop(key, None)
    return obj


trace_lines = st.one_of(
    trace_objects().map(lambda o: json.dumps(o)),
    json_values.map(lambda v: json.dumps(v)),
    st.text(max_size=40),
    st.sampled_from(["{", '{"timestamp": 1', "[" * 5000 + "]" * 5000, "{" * 3000, "NaN", "1e999", "\x00",
                     '{"timestamp": 1e999, "input_length": 1, "output_length": 1, "hash_ids": [0]}',
                     '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1e999]}']),
)


@FUZZ
@given(trace_lines)
def test_parse_line_raises_only_one_line_value_errors(line: str) -> None:
    try:
        ts, inp, out, ids = parse_line(line)
    except ValueError as exc:
        _one_line(exc)
        return
    assert math.isfinite(ts) and ts >= 0 and inp >= 1 and out >= 1
    assert len(ids) == math.ceil(inp / 512) and all(isinstance(h, int) and h >= 0 for h in ids)


@FUZZ
@given(st.lists(trace_lines, max_size=8), st.booleans(), st.booleans(), st.integers(1, 4))
def test_trace_files_refuse_or_skip_every_bad_line(tmp_path_factory: Any, lines: list[str], skip: bool,
                                                   truncate: bool, k: int) -> None:
    path = tmp_path_factory.mktemp("fz") / "t.jsonl"
    text = "\n".join(l.replace("\n", " ").replace("\r", " ") for l in lines) + "\n"
    if truncate and len(text) > 3:
        text = text[: len(text) // 2]
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load = load_trace(path, on_error="skip" if skip else "raise", context_factor=k)
    except TraceError as exc:
        _one_line(exc)
        assert not skip or "not UTF-8" in str(exc)
        assert str(exc).startswith(f"{path}:")
        return
    for issue in load.skipped:
        _one_line(Exception(str(issue)))
        assert issue.path == str(path) and issue.line_no >= 1
    assert all(r.input_tokens >= k and r.output_tokens >= 1 for r in load.requests)


@FUZZ
@given(st.binary(max_size=200))
def test_trace_files_of_any_bytes(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fz") / "t.jsonl"
    path.write_bytes(data)
    for on_error in ("raise", "skip"):
        try:
            load_trace(path, on_error=on_error)
        except TraceError as exc:
            _one_line(exc)


@FUZZ
@given(json_values, json_values, json_values, json_values, json_values, json_values)
def test_trace_reader_arguments(start: Any, duration: Any, rate: Any, k: Any, limit: Any, on_error: Any) -> None:
    try:
        list(iter_trace(Path(__file__).with_name("missing.jsonl"), start_s=start, duration_s=duration,
                        rate_multiplier=rate, context_factor=k, max_requests=limit, on_error=on_error,
                        skipped=[]))
    except TraceError as exc:
        _one_line(exc)


# -- scenarios ---------------------------------------------------------------------------------

FLOW_FIELDS = ("src", "dst", "start_s", "duration_s", "rate_gbps", "protocol", "extra")


@st.composite
def scenarios(draw: Any) -> Any:
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)
    flows = []
    for _ in range(draw(st.integers(0, 3))):
        flow: dict[str, Any] = {"src": "g0", "dst": "g3", "start_s": 0, "duration_s": 5, "rate_gbps": 1.0}
        for key in draw(st.lists(st.sampled_from(FLOW_FIELDS), max_size=2)):
            flow[key] = draw(json_values)
        flows.append(flow)
    data: dict[str, Any] = {"name": "fz", "flows": flows}
    for key in draw(st.lists(st.sampled_from(("name", "description", "flows", "other")), max_size=1)):
        data[key] = draw(json_values)
    return data


@FUZZ
@given(scenarios())
def test_scenario_parse_raises_only_scenario_errors(data: Any) -> None:
    try:
        scen = scenario_mod.parse(data, TOPO, "fz.json")
    except scenario_mod.ScenarioError as exc:
        _one_line(exc)
        assert str(exc).startswith("fz.json")
        return
    for f in scen.flows:
        assert all(math.isfinite(v) for v in (f.start_s, f.duration_s, f.rate_gbps))


@FUZZ
@given(st.binary(max_size=120))
def test_scenario_files_of_any_bytes(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fz") / "s.json"
    path.write_bytes(data)
    try:
        scenario_mod.load(str(path), TOPO)
    except scenario_mod.ScenarioError as exc:
        _one_line(exc)


# -- experiment, testbed and replay configurations -----------------------------------------------

REPLAY_KEYS = [f for f in ReplayConfig().to_dict()]


@st.composite
def replay_dicts(draw: Any) -> Any:
    data: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(REPLAY_KEYS + ["unknown_key"]), max_size=3)):
        data[key] = draw(json_values)
    return data


@FUZZ
@given(replay_dicts())
def test_replay_config_raises_only_replay_config_errors(data: Any) -> None:
    try:
        cfg = ReplayConfig.from_dict(data)
    except ReplayConfigError as exc:
        _one_line(exc)
        return
    again = ReplayConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert json.dumps(again.to_dict()) == json.dumps(cfg.to_dict())  # NaN inside free-form dicts != itself


@FUZZ
@given(json_values)
def test_replay_config_from_anything(data: Any) -> None:
    try:
        ReplayConfig.from_dict(data)
    except ReplayConfigError as exc:
        _one_line(exc)


EXPERIMENT_KEYS = ["schedulers", "scenario", "testbed", "replay", "out_dir", "recorded"]


@FUZZ
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(EXPERIMENT_KEYS + ["bogus"]), json_values, max_size=3)))
def test_experiment_config_raises_only_experiment_errors(data: Any) -> None:
    try:
        exp = ExperimentConfig.from_json(data)
    except ExperimentError as exc:
        _one_line(exc)
        return
    assert isinstance(exp.schedulers, list) and all(isinstance(s, str) for s in exp.schedulers)
    assert isinstance(exp.scenario, str) and isinstance(exp.out_dir, str)
    assert all(isinstance(getattr(exp, k), dict) for k in ("testbed", "replay", "recorded"))


TESTBED_KEYS = list(TestbedConfig().to_json())


@FUZZ
@given(st.dictionaries(st.sampled_from(TESTBED_KEYS + ["bogus"]), json_values, max_size=3))
def test_testbed_config_raises_only_config_errors(data: Any) -> None:
    try:
        TestbedConfig.from_json(data).validate()
    except ConfigError as exc:
        _one_line(exc)


# -- what the fuzzing found, pinned ------------------------------------------------------------

HUGE = 10**400  # an integer JSON allows and float() cannot hold


@pytest.mark.parametrize("call, error, fragment", [
    (lambda: parse_line("[" * 100_000 + "]" * 100_000), ValueError, "nested too deeply"),
    (lambda: parse_line(json.dumps({"timestamp": HUGE, "input_length": 1, "output_length": 1, "hash_ids": [0]})),
     ValueError, "timestamp must be a finite number"),
    (lambda: parse_line(json.dumps({"timestamp": 0, "input_length": HUGE, "output_length": 1, "hash_ids": [0]})),
     ValueError, "hash_ids has 1 blocks but input_length"),
    (lambda: list(iter_trace(Path("x"), start_s=HUGE)), TraceError, "start_s must be a finite number"),
    (lambda: list(iter_trace(Path("x"), max_requests="5")), TraceError, "max_requests must be >= 1 or None"),  # type: ignore[arg-type]
    (lambda: ReplayConfig(seed=HUGE), ReplayConfigError, "seed must be a whole number in"),
    (lambda: ReplayConfig(perf_overrides={"prefill_mfu": HUGE}), ReplayConfigError,
     "'prefill_mfu' must be a finite number"),
    (lambda: ReplayConfig(on_trace_error=["raise"]), ReplayConfigError, "on_trace_error must be one of"),  # type: ignore[arg-type]
    (lambda: ReplayConfig(slo={"tbt_stat": ["mean"]}), ReplayConfigError, "tbt_stat must be one of"),
    (lambda: ReplayConfig(slo={"tbt_slo_ms": HUGE}), ReplayConfigError, "tbt_slo_ms must be a finite number"),
    (lambda: ReplayConfig.from_dict(["seed"]), ReplayConfigError, "replay config must be a JSON object, got list"),  # type: ignore[arg-type]
    (lambda: scenario_mod.parse({"name": "s", "flows": [{"src": ["g0"], "dst": "g1", "duration_s": 1,
                                                        "rate_gbps": 1}]}, TOPO), scenario_mod.ScenarioError,
     "src ['g0'] is not a GPU host"),
    (lambda: scenario_mod.parse({"name": "s", "flows": [{"src": "g0", "dst": "g1", "start_s": float("inf"),
                                                        "duration_s": 1, "rate_gbps": 1}]}, TOPO),
     scenario_mod.ScenarioError, "start_s must be a finite number >= 0, got inf"),
    (lambda: scenario_mod.parse({"name": "s", "flows": [{"src": "g0", "dst": "g1", "duration_s": HUGE,
                                                        "rate_gbps": 1}]}, TOPO),
     scenario_mod.ScenarioError, "duration_s must be a finite number >= 1"),
    (lambda: scenario_mod.parse({"name": "s", "flows": [{"src": "g0", "dst": "g1", "duration_s": 1,
                                                        "rate_gbps": 1, "protocol": {}}]}, TOPO),
     scenario_mod.ScenarioError, "protocol must be tcp or udp"),
    (lambda: ExperimentConfig.from_json({"replay": 5}), ExperimentError, "'replay' must be a JSON object, got 5"),
    (lambda: ExperimentConfig.from_json({"schedulers": "netkv"}), ExperimentError,
     "'schedulers' must be a list of names, got 'netkv'"),
    (lambda: TestbedConfig.from_json({"scale": "x"}).validate(), ConfigError, "scale must be a finite number, got 'x'"),
    (lambda: TestbedConfig.from_json({"topology": ["tiny"]}).validate(), ConfigError, "topology must be a string"),
    (lambda: TestbedConfig.from_json({"params": {"gpu_link_gbps": HUGE}}).validate(), ConfigError,
     "gpu_link_gbps must be a number"),
    (lambda: TestbedConfig.from_json(7), ConfigError, "testbed configuration must be a JSON object, got int"),  # type: ignore[arg-type]
])
def test_found_by_fuzzing(call: Any, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as err:
        call()
    assert fragment in str(err.value)
    _one_line(err.value)


def test_scenario_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_bytes(b"\x80{}")
    with pytest.raises(scenario_mod.ScenarioError, match="not UTF-8 text"):
        scenario_mod.load(str(path), TOPO)
