"""tuned_cache_load's default weights: read from the sweep's result file
(bench/tune.py), placeholders that say so without it, malformed files refused;
the sweep's shortcut (equivalent weight combinations share one replay) checked
on random decode states."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

import topologies
from bench.tune import canonical
from netkv.oracle import StaticOracle
from netkv.request import BLOCK_TOKENS, DecodeView, Request
from netkv.schedulers import TUNING_GRID, TunedCacheLoad, create
from netkv.schedulers.baselines import TUNED_DEFAULTS, TUNED_WEIGHTS_FILE, load_tuned_weights

TOPO = topologies.build("fattree")


def test_missing_file_gives_placeholders_that_say_so(tmp_path: Path) -> None:
    weights, source = load_tuned_weights(tmp_path / "none.json")
    assert weights == {"w_cache": 1.0, "w_load": 1.0}
    assert "untuned placeholder" in source


def test_file_weights_are_read(tmp_path: Path) -> None:
    f = tmp_path / "w.json"
    f.write_text(json.dumps({"weights": {"w_cache": 2.0, "w_load": 0.25}, "date": "D", "tuning_window_s": [600, 660]}))
    weights, source = load_tuned_weights(f)
    assert weights == {"w_cache": 2.0, "w_load": 0.25}
    assert "untuned" not in source and "[600, 660]" in source


@pytest.mark.parametrize("body", ["not json", json.dumps({"weights": {"w_cache": 1.0}}),
                                  json.dumps({"weights": {"w_cache": 1.0, "w_load": -1.0}}),
                                  json.dumps({"weights": {"w_cache": 1.0, "w_load": 1.0, "w_x": 1.0}}),
                                  json.dumps({"weights": {"w_cache": "a", "w_load": 1.0}})])
def test_malformed_file_is_refused(tmp_path: Path, body: str) -> None:
    f = tmp_path / "bad.json"
    f.write_text(body)
    with pytest.raises(ValueError, match="bad.json"):
        load_tuned_weights(f)


def test_scheduler_defaults_are_the_loaded_weights() -> None:
    defaults = {k: p.default for k, p in TunedCacheLoad.params.items()}
    assert {k: defaults[k] for k in TUNED_DEFAULTS} == dict(TUNED_DEFAULTS)
    assert defaults["kv_memory"] == 0.0  # the load signal the weights were tuned with
    assert load_tuned_weights()[0] == dict(TUNED_DEFAULTS)


def test_shipped_result_is_consistent() -> None:
    if not TUNED_WEIGHTS_FILE.exists():
        pytest.skip("no sweep result shipped")
    data = json.loads(TUNED_WEIGHTS_FILE.read_text())
    grid = {k: list(v) for k, v in TUNING_GRID.items()}
    assert data["grid"] == grid
    assert len(data["results"]) == math.prod(len(v) for v in grid.values())
    measured = [r for r in data["results"] if r["objective_ms"] is not None]
    best = min(r["objective_ms"] for r in measured)
    first_best = next(r for r in data["results"] if r["objective_ms"] == best)
    assert first_best["weights"] == data["weights"]
    t0, t1 = data["tuning_window_s"]
    e0, e1 = data["evaluation_window_s"]
    assert t1 <= e0 or e1 <= t0, "tuned on the evaluation window"


def test_equivalent_combinations_choose_the_same_decode() -> None:
    rng = random.Random(7)
    classes: dict[tuple[tuple[str, float], ...], list[dict[str, float]]] = {}
    keys = sorted(TUNING_GRID)
    for combo in itertools.product(*(TUNING_GRID[k] for k in keys)):
        w = dict(zip(keys, combo))
        classes.setdefault(canonical(w), []).append(w)
    assert len(classes) == 12  # 36 combinations
    oracle = StaticOracle(TOPO)
    distinct = set()
    for trial in range(300):
        blocks = [rng.randrange(40) for _ in range(8)]
        request = Request(f"r{trial}", 0.0, 8 * BLOCK_TOKENS, 50, tuple(blocks))
        views = []
        for i in range(1, 64, 2):
            n = rng.randrange(9)
            views.append(DecodeView(f"g{i}", queue_len=rng.randrange(4), active_batch=rng.randrange(128),
                                    max_batch=128, free_kv_tokens=10**6, cached_blocks=frozenset(blocks[:n])))
        picks = []
        for members in classes.values():
            chosen = {create("tuned_cache_load", w, kv_bytes_per_token=131072).choose(
                request, "g0", views, oracle, 0.0).decode for w in members}
            assert len(chosen) == 1, (members, chosen)
            picks.append(chosen.pop())
        distinct.add(tuple(picks))
    assert len(distinct) > 1, "the classes never differ: the check would not notice a wrong equivalence"
