"""Pooling campaigns: several campaigns of one experiment, on disjoint trace
windows, read as one campaign with all their windows.

A campaign of three windows often leaves an interval too wide to answer; the
same experiment run again on other windows narrows it only if the two are
read together, paired by window as every campaign is.  :func:`pool` makes a
campaign directory whose windows are the inputs' windows, linked (not copied)
and renumbered in the order given, with an ``experiment.json`` that is the
first input's with every window start; ``netkv report`` then reads it as any
campaign.  It refuses inputs that are not the same experiment (schedulers,
variants, scenario, replay settings and fabric; only the instance prefix, the
ports, the replay order and the descriptive fields may differ) and windows
that overlap, since a change is only as independent as its windows.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lab.rundir import window_dir_name, window_runs

# may differ between the campaigns pooled: where and when they ran, not what
FREE_KEYS = frozenset({"description", "out_dir", "recorded", "window_starts_s", "order", "order_seed"})
FREE_TESTBED_KEYS = frozenset({"prefix", "of_port", "rest_port"})


class PoolError(ValueError):
    """Inputs that cannot be pooled; the message is one line."""


def _experiment(run: Path) -> dict[str, Any]:
    try:
        exp = json.loads((run / "experiment.json").read_text())
    except (OSError, ValueError) as exc:
        raise PoolError(f"{run}: no readable experiment.json ({exc})") from None
    if not isinstance(exp, dict) or not exp.get("window_starts_s"):
        raise PoolError(f"{run}: not a campaign (its experiment.json names no windows)")
    return exp


def _what(exp: dict[str, Any]) -> dict[str, Any]:
    """The part of an experiment that must be equal for its windows to pool."""
    out = {k: v for k, v in exp.items() if k not in FREE_KEYS}
    out["testbed"] = {k: v for k, v in (exp.get("testbed") or {}).items() if k not in FREE_TESTBED_KEYS}
    return out


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted name of the first setting (in sorted order) that differs
    between two experiments, descending into sections; None when equal."""
    if a == b:
        return None
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return where
    for key in sorted(set(a) | set(b)):
        found = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        if found is not None:
            return found
    return where


def pool(out: Path, runs: list[Path]) -> Path:
    """Make ``out`` the campaign of every window of ``runs`` (see the module
    docstring); ``out`` must not exist yet.  Returns ``out``."""
    if len(runs) < 2:
        raise PoolError("pool needs at least two campaigns")
    if len({r.resolve() for r in runs}) != len(runs):
        raise PoolError("a campaign is given twice")
    exps = [_experiment(r) for r in runs]
    first = _what(exps[0])
    for run, exp in zip(runs[1:], exps[1:]):
        what = _what(exp)
        key = _first_difference(first, what)
        if key is not None:
            raise PoolError(f"{run} is not the same experiment as {runs[0]}: {key} differs")
    length_s = float((exps[0].get("replay") or {}).get("duration_s") or 0.0)
    windows: list[tuple[float, Path]] = []
    for run, exp in zip(runs, exps):
        found = window_runs(run)
        starts = [float(s) for s in exp["window_starts_s"]]
        if len(found) != len(starts):
            raise PoolError(f"{run}: {len(found)} of its {len(starts)} windows have a run directory")
        windows += list(zip(starts, found))
    ordered = sorted(s for s, _ in windows)
    for a, b in zip(ordered, ordered[1:]):
        if b < a + length_s:
            raise PoolError(f"windows at {a:g} s and {b:g} s overlap ({length_s:g} s each): pooled windows "
                            "must be disjoint")
    if out.exists():
        raise PoolError(f"{out} exists; pool writes a new directory")
    out.mkdir(parents=True)
    for i, (start, path) in enumerate(windows):
        os.symlink(path.resolve(), out / window_dir_name(i, start), target_is_directory=True)
    scenario = runs[0] / "scenario.json"
    if scenario.is_file():
        (out / "scenario.json").write_text(scenario.read_text())
    pooled = dict(exps[0])
    pooled["window_starts_s"] = [s for s, _ in windows]
    pooled["out_dir"] = str(out.resolve())
    pooled["recorded"] = {"pooled_from": [str(r.resolve()) for r in runs], "pooled_epoch_s": round(time.time(), 3),
                          "commits": [(e.get("recorded") or {}).get("git_commit") for e in exps]}
    (out / "experiment.json").write_text(json.dumps(pooled, indent=2) + "\n")
    return out
