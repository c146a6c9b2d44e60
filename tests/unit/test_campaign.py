"""Campaigns (several trace windows) and sweeps: the statistics, the window
checks and the aggregation, from files and dictionaries; no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cli.lab import parse_values
from lab.campaign import aggregate, render_campaign, render_pairs, summary
from lab.experiment import ExperimentConfig, ExperimentError, _check_windows, prepare
from lab.report import common_request_change, ttft_breakdown_ms
from lab.rundir import window_dir_name, window_runs
from lab.sweep import SWEEPS, SweepError, plan, point_experiment
from netkv.serving.config import ReplayConfig
from netkv.slo import ttft_attainment_curve


def test_summary_uses_student_t_and_calls_an_interval_over_zero_not_significant() -> None:
    s = summary([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3)
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["ci95"] == pytest.approx([2 - 2.4843, 2 + 2.4843], abs=1e-3)
    assert s["verdict"] == "not significant"
    assert summary([-10.0, -11.0, -12.0])["verdict"] == "significant"
    assert summary([5.0])["ci95"] is None and summary([5.0])["verdict"] == "not significant"
    assert summary([])["mean"] is None and summary([])["verdict"] == "no data"


def _base(duration_s: float | None = 60.0) -> ReplayConfig:
    return ReplayConfig(duration_s=duration_s)


def test_windows_must_be_disjoint_and_away_from_the_tuning_window() -> None:
    assert _check_windows(ExperimentConfig(window_starts_s=[0, 120, 240]), _base()) == [0.0, 120.0, 240.0]
    assert _check_windows(ExperimentConfig(), _base()) == []
    with pytest.raises(ExperimentError, match="overlap"):
        _check_windows(ExperimentConfig(window_starts_s=[0, 30]), _base())
    # the tuned baseline's weights were chosen on [600, 660) s of this trace
    with pytest.raises(ExperimentError, match="tuning window"):
        _check_windows(ExperimentConfig(window_starts_s=[0, 590]), _base())
    with pytest.raises(ExperimentError, match="duration_s"):
        _check_windows(ExperimentConfig(window_starts_s=[0, 100]), _base(None))
    for bad in ([-1], [True], ["0"], [float("nan")]):
        with pytest.raises(ExperimentError, match="window_starts_s"):
            _check_windows(ExperimentConfig(window_starts_s=bad), _base())  # type: ignore[arg-type]


def test_an_empty_window_is_refused_before_any_network(tmp_path: Path) -> None:
    exp = ExperimentConfig(window_starts_s=[0, 1e7], replay={"duration_s": 60.0}, out_dir=str(tmp_path / "r"),
                           testbed={"topology": "tiny"}, scenario="none")
    with pytest.raises(ExperimentError, match="holds no request"):
        prepare(exp)


def _records() -> list[dict[str, Any]]:
    ok = {"status": "ok", "arrival_ms": 0.0, "prefill_start_ms": 100.0, "prefill_end_ms": 400.0,
          "transfer_end_ms": 450.0, "decode_admit_ms": 470.0, "first_token_ms": 500.0, "ttft_ms": 500.0}
    slow = {**ok, "prefill_start_ms": 2100.0, "prefill_end_ms": 2400.0, "transfer_end_ms": 2450.0,
            "decode_admit_ms": 2470.0, "first_token_ms": 2500.0, "ttft_ms": 2500.0}
    return [ok, slow, {"status": "failed", "ttft_ms": None}]


def test_breakdown_parts_add_up_to_ttft() -> None:
    recs = _records()
    parts = ttft_breakdown_ms(recs)
    assert parts == {"prefill queue": 1100.0, "prefill": 300.0, "KV transfer": 50.0, "decode queue": 20.0,
                     "first step": 30.0}
    assert sum(v for v in parts.values() if v is not None) == pytest.approx(1500.0)  # mean TTFT of the ok ones
    curve = dict(ttft_attainment_curve(recs, (250.0, 500.0, 4000.0)))
    assert curve[250.0] == 0.0 and curve[500.0] == pytest.approx(1 / 3, abs=1e-4) and curve[4000.0] == pytest.approx(2 / 3, abs=1e-4)


def _window(run: Path, i: int, start: float, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One window's comparison as lab.report.compare writes it.  Unless a
    scheduler's ``common`` says otherwise, both of a pair served the same
    requests, so the change over common requests is the plain one."""
    d = run / window_dir_name(i, start)
    d.mkdir(parents=True)
    (d / "experiment.json").write_text("{}")
    per = {}
    for name, m in metrics.items():
        per[name] = {"ttft_mean_ms": m["ttft"], "ttft_slo_attainment": m["slo"], "partial": m.get("partial", False),
                     "requests": 10, "requests_expected": 10, "requests_without_record": 0,
                     "tbt_mean_ms": m.get("tbt", 10.0), "decision_us_p99": m.get("decide_us", 100.0),
                     "verdict": {"within_envelope": m.get("inside", True), "limiting_resource": m.get("why")}}
    common = {a: {b: m.get("common", {}).get(b) or {"requests": 10, "pct": 100.0 * (m["ttft"] / o["ttft"] - 1),
                                                     "ms": m["ttft"] - o["ttft"]}
                  for b, o in metrics.items() if b != a} for a, m in metrics.items()}
    return {"schedulers": per, "ttft_mean_change_common": common}


def test_campaign_pairs_changes_by_window_and_keeps_partial_windows_out(tmp_path: Path) -> None:
    run = tmp_path / "c"
    run.mkdir()
    (run / "experiment.json").write_text(json.dumps({"schedulers": ["round_robin", "netkv"], "scenario": "none",
                                                     "window_starts_s": [0, 100, 200, 300],
                                                     "replay": {"duration_s": 60}}))
    comps = [
        _window(run, 0, 0, {"round_robin": {"ttft": 1000.0, "slo": 0.8}, "netkv": {"ttft": 900.0, "slo": 0.9}}),
        _window(run, 1, 100, {"round_robin": {"ttft": 2000.0, "slo": 0.5}, "netkv": {"ttft": 1700.0, "slo": 0.7}}),
        _window(run, 2, 200, {"round_robin": {"ttft": 500.0, "slo": 1.0}, "netkv": {"ttft": 460.0, "slo": 1.0}}),
        _window(run, 3, 300, {"round_robin": {"ttft": 500.0, "slo": 1.0},
                              "netkv": {"ttft": 100.0, "slo": 1.0, "partial": True}}),
    ]
    assert [p.name for p in window_runs(run)] == ["w0-0s", "w1-100s", "w2-200s", "w3-300s"]
    c = aggregate(run, comps)
    change = c["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert change["values"] == pytest.approx([-10.0, -15.0, -8.0])  # the partial window is left out
    assert change["verdict"] == "significant" and change["ci95"][1] < 0
    in_ms = c["ttft_mean_change_ms"]["netkv"]["round_robin"]
    assert in_ms["values"] == pytest.approx([-100.0, -300.0, -40.0])  # same pairing, in ms
    assert c["ttft_slo_attainment_change_pp"]["netkv"]["round_robin"]["values"] == pytest.approx([10.0, 20.0, 0.0])
    assert c["nothing_lost"] is False  # one replay is partial
    # a partial replay's figures are not its window's: left out of the scheduler's figures too
    assert c["schedulers"]["netkv"]["ttft_mean_ms"]["n"] == 3
    assert c["schedulers"]["netkv"]["ttft_mean_ms"]["windows_left_out"] == ["w3-300s"]
    assert c["schedulers"]["round_robin"]["ttft_mean_ms"]["n"] == 4
    paper = {row["figure"]: row for row in c["versus_paper"]}
    assert paper["mean TTFT change vs round_robin (%)"]["paper"] == -21.2
    assert paper["NetKV decision p99, live, wall (ms)"]["testbed"]["mean"] == pytest.approx(0.1)


def test_sweep_points_differ_from_the_base_in_their_knob_only(tmp_path: Path) -> None:
    base = ExperimentConfig(schedulers=["round_robin", "netkv"], replay={"duration_s": 30.0},
                            testbed={"topology": "fattree", "params": {"tor_oversub": 1.0}})
    p = point_experiment(base, SWEEPS["oversub"], 4.0, tmp_path)
    assert p.testbed["params"] == {"tor_oversub": 1.0, "agg_oversub": 4.0} and p.replay == base.replay
    assert base.testbed["params"] == {"tor_oversub": 1.0}  # the base is not changed
    assert Path(p.out_dir).name == "agg_oversub=4" and p.window_starts_s == [0.0]
    load = point_experiment(base, SWEEPS["load"], 2.0, tmp_path)
    assert load.replay["rate_multiplier"] == 2.0 and load.schedulers == ["round_robin", "netkv"]
    ctx = SWEEPS["context"]
    assert point_experiment(base, ctx, 2, tmp_path).schedulers == list(ctx.schedulers or ())
    assert point_experiment(base, ctx, 2, tmp_path, keep_schedulers=True).schedulers == ["round_robin", "netkv"]
    # a knob's own schedulers take only the variants among them; its points serve every length
    with_aa = ExperimentConfig(schedulers=["netkv", "netkv@aa"], variants={"netkv@aa": {"scheduler": "netkv"}},
                               replay={"duration_s": 30.0})
    point = point_experiment(with_aa, ctx, 2, tmp_path)
    assert point.variants == {} and point.replay["model_context"] == "ignore"
    assert point_experiment(with_aa, ctx, 2, tmp_path, keep_schedulers=True).variants == with_aa.variants
    # a knob that multiplies every transfer's bytes scales the emulation with it, nothing else
    scaled = {**base.testbed, "scale": 40_000.0}
    four = point_experiment(ExperimentConfig(testbed=scaled, replay={"duration_s": 30.0}), ctx, 4, tmp_path)
    assert four.testbed["scale"] == 160_000.0 and four.replay["context_factor"] == 4
    big = point_experiment(ExperimentConfig(testbed=scaled), SWEEPS["model"], "llama-2-13b", tmp_path)
    assert big.testbed["scale"] == 40_000.0 * 819_200 / 131_072 and big.replay["model"] == "llama-2-13b"
    assert point_experiment(ExperimentConfig(testbed=scaled), SWEEPS["load"], 3.0, tmp_path).testbed["scale"] == 40_000.0


def test_bad_sweep_values_are_refused_with_the_point_named(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="not a comma-separated list"):
        parse_values(SWEEPS["load"], "1,fast")
    with pytest.raises(SweepError, match="finite"):
        parse_values(SWEEPS["load"], "1,inf")
    assert parse_values(SWEEPS["load"], "0.5, 2") == [0.5, 2.0]
    base = ExperimentConfig(schedulers=["round_robin"], replay={"duration_s": 30.0}, scenario="none",
                            testbed={"topology": "tiny"})
    with pytest.raises(SweepError, match="rate_multiplier=-1.0: rate_multiplier must be"):
        plan(base, SWEEPS["load"], [1.0, -1.0], tmp_path / "s")
    with pytest.raises(SweepError, match="twice"):
        plan(base, SWEEPS["load"], [1.0, 1.0], tmp_path / "s")


def _campaign(run: Path, windows: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    run.mkdir()
    names = list(windows[0])
    (run / "experiment.json").write_text(json.dumps({"schedulers": names, "scenario": "none",
                                                     "window_starts_s": [100.0 * i for i in range(len(windows))],
                                                     "replay": {"duration_s": 60}}))
    return aggregate(run, [_window(run, i, 100.0 * i, w) for i, w in enumerate(windows)])


def test_a_window_outside_the_envelope_leaves_the_headline_and_stays_in_the_second_line(tmp_path: Path) -> None:
    c = _campaign(tmp_path / "c", [
        {"round_robin": {"ttft": 1000.0, "slo": 0.8}, "netkv": {"ttft": 900.0, "slo": 0.9}},
        {"round_robin": {"ttft": 2000.0, "slo": 0.5}, "netkv": {"ttft": 1700.0, "slo": 0.7}},
        {"round_robin": {"ttft": 500.0, "slo": 1.0},
         "netkv": {"ttft": 100.0, "slo": 1.0, "inside": False, "why": "machine CPU (p95 91% busy)"}},
        {"round_robin": {"ttft": 500.0, "slo": 1.0}, "netkv": {"ttft": 460.0, "slo": 1.0}},
    ])
    head = c["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert head["values"] == pytest.approx([-10.0, -15.0, -8.0]) and head["windows_left_out"] == ["w2-200s"]
    every = c["ttft_mean_change_pct_all_windows"]["netkv"]["round_robin"]
    assert every["values"] == pytest.approx([-10.0, -15.0, -80.0, -8.0])
    # the per-scheduler figure of the scheduler outside leaves that window out too; the other keeps it
    assert c["schedulers"]["netkv"]["ttft_mean_ms"]["n"] == 3 and c["schedulers"]["round_robin"]["ttft_mean_ms"]["n"] == 4
    assert c["schedulers_all_windows"]["netkv"]["ttft_mean_ms"]["n"] == 4
    assert c["outside_envelope"] == [{"window": "w2-200s", "scheduler": "netkv",
                                      "limiting_resource": "machine CPU (p95 91% busy)"}]
    assert "left out of the headline" in render_campaign(c)


def test_an_unjudged_replay_is_not_inside(tmp_path: Path) -> None:
    c = _campaign(tmp_path / "c", [
        {"round_robin": {"ttft": 1000.0, "slo": 0.8, "tbt": 10.0}, "netkv": {"ttft": 900.0, "slo": 0.9, "tbt": 12.5}},
        {"round_robin": {"ttft": 2000.0, "slo": 0.5, "inside": None, "why": "no envelope.json"},
         "netkv": {"ttft": 1700.0, "slo": 0.7}},
        {"round_robin": {"ttft": 500.0, "slo": 1.0}, "netkv": {"ttft": 460.0, "slo": 1.0}},
    ])
    head = c["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert head["values"] == pytest.approx([-10.0, -8.0]) and head["windows_left_out"] == ["w1-100s"]
    assert c["unjudged"] == [{"window": "w1-100s", "scheduler": "round_robin", "limiting_resource": "no envelope.json"}]
    # time between tokens: paired by window like TTFT, in ms, with the same windows left out
    tbt = c["tbt_mean_change_ms"]["netkv"]["round_robin"]
    assert tbt["values"] == pytest.approx([2.5, 0.0]) and tbt["windows_left_out"] == ["w1-100s"]
    assert c["outside_envelope"] == []


def test_fewer_than_two_windows_inside_is_not_a_result(tmp_path: Path) -> None:
    c = _campaign(tmp_path / "c", [
        {"round_robin": {"ttft": 1000.0, "slo": 0.8}, "netkv": {"ttft": 900.0, "slo": 0.9, "inside": False}},
        {"round_robin": {"ttft": 2000.0, "slo": 0.5}, "netkv": {"ttft": 1700.0, "slo": 0.7}},
    ])
    head = c["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert head["n"] == 1 and head["verdict"].startswith("not a result")
    every = c["ttft_mean_change_pct_all_windows"]["netkv"]["round_robin"]
    assert every["n"] == 2 and every["verdict"] == "not significant"  # an interval, too wide, but a result


def test_changes_pair_the_requests_both_served_where_failures_differ(tmp_path: Path) -> None:
    # netkv failed fewer requests: its plain mean includes slow requests round_robin never served
    common = {"round_robin": {"requests": 8, "pct": -20.0, "ms": -200.0}}
    c = _campaign(tmp_path / "c", [
        {"round_robin": {"ttft": 1000.0, "slo": 0.8}, "netkv": {"ttft": 1100.0, "slo": 0.9, "common": common}},
        {"round_robin": {"ttft": 2000.0, "slo": 0.5}, "netkv": {"ttft": 2100.0, "slo": 0.7, "common": common}},
    ])
    assert c["ttft_mean_change_pct"]["netkv"]["round_robin"]["values"] == pytest.approx([-20.0, -20.0])
    assert c["ttft_mean_change_ms"]["netkv"]["round_robin"]["values"] == pytest.approx([-200.0, -200.0])
    assert c["ttft_mean_change_pct_served"]["netkv"]["round_robin"]["values"] == pytest.approx([10.0, 5.0])


def test_common_request_change_is_over_the_intersection() -> None:
    a = {"r1": 100.0, "r2": 300.0, "r3": 5000.0}
    b = {"r1": 200.0, "r2": 200.0, "r4": 50.0}
    out = common_request_change(a, b)
    assert out == {"requests": 2, "only_a": 1, "only_b": 1, "pct": 0.0, "ms": 0.0}
    assert common_request_change(a, {})["pct"] is None


def test_an_aa_label_gives_the_noise_floor(tmp_path: Path) -> None:
    c = _campaign(tmp_path / "c", [
        {"netkv": {"ttft": 1000.0, "slo": 0.8}, "netkv@aa": {"ttft": 1010.0, "slo": 0.8}},
        {"netkv": {"ttft": 2000.0, "slo": 0.5}, "netkv@aa": {"ttft": 1980.0, "slo": 0.5}},
        {"netkv": {"ttft": 500.0, "slo": 1.0}, "netkv@aa": {"ttft": 505.0, "slo": 1.0}},
    ])
    floor = c["aa_noise_floor"]["netkv"]["ttft_mean_change_pct"]
    assert c["aa_noise_floor"]["netkv"]["label"] == "netkv@aa"
    assert floor["values"] == pytest.approx([1.0, -1.0, 1.0]) and floor["verdict"] == "not significant"


def test_orders_and_variants(tmp_path: Path) -> None:
    exp = ExperimentConfig(schedulers=["a", "b", "c"], order="alternate")
    assert [exp.replay_order(i) for i in range(3)] == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    rnd = ExperimentConfig(schedulers=["a", "b", "c", "d"], order="random", order_seed=7)
    orders = [rnd.replay_order(i) for i in range(6)]
    assert orders == [rnd.replay_order(i) for i in range(6)]  # from the seed alone
    assert all(sorted(o) == ["a", "b", "c", "d"] for o in orders) and len({tuple(o) for o in orders}) > 1
    with pytest.raises(ExperimentError, match="'order' must be one of"):
        ExperimentConfig.from_json({"order": "sometimes"})
    base = dict(replay={"duration_s": 30.0}, scenario="none", testbed={"topology": "tiny"},
                out_dir=str(tmp_path / "r"))
    ok = ExperimentConfig(schedulers=["netkv", "netkv_static"], **base,  # type: ignore[arg-type]
                          variants={"netkv_static": {"scheduler": "netkv", "oracle": "static"}})
    _, replay, _, _ = prepare(ok)
    cfg = ok.replay_config(replay, "netkv_static")
    assert (cfg.scheduler, cfg.oracle) == ("netkv", "static") and ok.replay_config(replay, "netkv").oracle == "static"
    for variants, message in (({"x": {"scheduler": "nope"}}, "variant 'x': unknown scheduler 'nope'"),
                              ({"x": {"scheduler": "netkv", "start_s": 5.0}}, "may not set 'start_s'"),
                              ({"x": {"scheduler": "netkv", "oracel": "static"}}, "unknown replay config key")):
        bad = ExperimentConfig(schedulers=["netkv", "x"], variants=variants, **base)  # type: ignore[arg-type]
        with pytest.raises(ExperimentError, match=message):
            prepare(bad)


def test_render_pairs_names_each_pair_and_the_noise_floor(tmp_path: Path) -> None:
    c = _campaign(tmp_path / "c", [
        {"netkv": {"ttft": 900.0, "slo": 0.9}, "netkv@aa": {"ttft": 910.0, "slo": 0.9},
         "round_robin": {"ttft": 1000.0, "slo": 0.8}},
        {"netkv": {"ttft": 1700.0, "slo": 0.7}, "netkv@aa": {"ttft": 1690.0, "slo": 0.7},
         "round_robin": {"ttft": 2000.0, "slo": 0.5}},
    ])
    text = render_pairs(c, [("netkv", "round_robin")])
    assert text.splitlines()[0].startswith("noise floor, netkv@aa vs netkv: mean TTFT ")
    assert text.splitlines()[1].startswith("netkv vs round_robin: mean TTFT -12.5 [")


def _small_campaign(run: Path, starts: list[float], changes: list[float], **exp_extra: Any) -> list[dict[str, Any]]:
    run.mkdir()
    exp = {"schedulers": ["round_robin", "netkv"], "scenario": "none", "window_starts_s": starts,
           "replay": {"duration_s": 60}, "testbed": {"topology": "fattree", "prefix": run.name[:2]}, **exp_extra}
    (run / "experiment.json").write_text(json.dumps(exp))
    return [_window(run, i, s, {"round_robin": {"ttft": 1000.0, "slo": 0.8},
                                "netkv": {"ttft": 1000.0 * (1 + c / 100), "slo": 0.9}})
            for i, (s, c) in enumerate(zip(starts, changes))]


def test_pooled_campaigns_pair_every_window_of_both(tmp_path: Path) -> None:
    from lab.pool import pool

    a = _small_campaign(tmp_path / "aa", [1200.0, 1800.0, 2400.0], [2.0, -20.0, -15.0])
    b = _small_campaign(tmp_path / "bb", [300.0, 900.0, 1500.0], [-8.0, -12.0, -22.0])
    alone = aggregate(tmp_path / "aa", a)["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert alone["verdict"] == "not significant"
    out = pool(tmp_path / "both", [tmp_path / "aa", tmp_path / "bb"])
    assert [p.name for p in window_runs(out)] == ["w0-1200s", "w1-1800s", "w2-2400s", "w3-300s", "w4-900s",
                                                   "w5-1500s"]
    assert (out / "w3-300s").resolve() == (tmp_path / "bb" / "w0-300s").resolve()
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["window_starts_s"] == [1200.0, 1800.0, 2400.0, 300.0, 900.0, 1500.0]
    assert exp["recorded"]["pooled_from"] == [str((tmp_path / n).resolve()) for n in ("aa", "bb")]
    both = aggregate(out, a + b)["ttft_mean_change_pct"]["netkv"]["round_robin"]
    assert both["values"] == pytest.approx([2.0, -20.0, -15.0, -8.0, -12.0, -22.0])
    assert both["verdict"] == "significant" and both["ci95"][1] < 0
    assert ExperimentConfig.from_json(exp).window_starts_s == exp["window_starts_s"]  # reruns as one campaign


def test_pool_refuses_other_experiments_overlapping_windows_and_an_existing_directory(tmp_path: Path) -> None:
    from lab.pool import PoolError, pool

    _small_campaign(tmp_path / "aa", [0.0, 100.0], [1.0, 2.0])
    _small_campaign(tmp_path / "bb", [200.0, 300.0], [1.0, 2.0], scenario="core-hotspot")
    _small_campaign(tmp_path / "cc", [130.0, 400.0], [1.0, 2.0])
    _small_campaign(tmp_path / "dd", [500.0, 600.0], [1.0, 2.0], order="random")
    with pytest.raises(PoolError, match="not the same experiment .*: scenario differs"):
        pool(tmp_path / "x", [tmp_path / "aa", tmp_path / "bb"])
    with pytest.raises(PoolError, match="windows at 100 s and 130 s overlap"):
        pool(tmp_path / "y", [tmp_path / "aa", tmp_path / "cc"])
    with pytest.raises(PoolError, match="at least two"):
        pool(tmp_path / "z", [tmp_path / "aa"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    pool(tmp_path / "ok", [tmp_path / "aa", tmp_path / "dd"])  # another prefix and replay order pool
    with pytest.raises(PoolError, match="exists"):
        pool(tmp_path / "ok", [tmp_path / "aa", tmp_path / "dd"])
