"""``netkv sweep NAME``: one knob, several values, every scheduler at every point.

Each point is an ordinary ``netkv run`` campaign (its own directory,
experiment.json and windows) that differs from the base experiment in that one
knob only: the same trace windows, scenario and fabric settings, and the same
schedulers.  Above the points, ``sweep.json`` carries per point and scheduler
the mean TTFT and SLO attainment with 95% intervals across windows, NetKV's
paired change against each other scheduler, and each point's fidelity verdict;
``sweep.png`` draws them, points with a replay outside the emulator's envelope
hollow (and listed).  ``sweep-plan.json``, written first, lets ``netkv report``
remake the figures of a sweep that was interrupted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from fabric.config import TestbedConfig
from lab.campaign import write_campaign
from lab.experiment import ExperimentConfig, ExperimentError, prepare
from lab.engine import DEFAULT_ENGINE
from lab.run import run_experiment


@dataclass(frozen=True)
class Knob:
    name: str
    section: str  # "replay" (a ReplayConfig field), "testbed" (a TestbedConfig field), "params" (topology)
    key: str
    values: tuple[Any, ...]
    parse: Callable[[str], Any]
    schedulers: tuple[str, ...] | None  # None: the base experiment's
    help: str
    # For knobs that multiply the KV bytes of every transfer: the factor by
    # which the point's scale grows with the value, so that the bytes on the
    # wire per transfer, hence the packets per transfer, the packet rate and
    # the htb bucket's share of a transfer, stay those of the base point while
    # every emulated time stays the real one (scale k: rates and bytes both /k).
    scale_factor_of: Callable[[Any], float] | None = None
    # Replay settings every point of the knob takes besides the knob itself.
    replay_settings: tuple[tuple[str, Any], ...] = ()


_SCHEDULERS_THEOREM = ("round_robin", "cache_aware", "kv_router", "tuned_cache_load", "netkv")

def _kv_ratio(model: Any) -> float:
    from netkv import perfmodel

    return perfmodel.MODELS[str(model)].kv_bytes_per_token / perfmodel.MODELS[perfmodel.DEFAULT_MODEL].kv_bytes_per_token


SWEEPS: dict[str, Knob] = {k.name: k for k in (
    Knob("context", "replay", "context_factor", (1, 2, 4, 8), int, _SCHEDULERS_THEOREM,
         "context-length factor k: every request's input length and prefix blocks times k, arrivals kept "
         "(the gap between cache-aware-only scheduling and NetKV should grow with k); the scale grows "
         "with k so the packets per transfer stay the base point's; requests longer than the model's context "
         "are served anyway (model_context 'ignore': a stress of the network, not a deployment)",
         scale_factor_of=float, replay_settings=(("model_context", "ignore"),)),
    Knob("staleness", "replay", "telemetry_delay_ms", (0.0, 500.0, 1000.0, 2000.0, 5000.0), float, None,
         "telemetry the oracle sees is this many ms older than the latest poll (stale oracle)"),
    Knob("poll", "testbed", "poll_interval_s", (0.1, 0.5, 1.0, 2.0, 5.0), float, None,
         "the controller's statistics polling interval, s"),
    Knob("load", "replay", "rate_multiplier", (0.5, 1.0, 2.0, 3.0, 4.0), float, None,
         "offered load: arrivals sped up by this factor, up to and past saturation"),
    Knob("oversub", "params", "agg_oversub", (1.0, 2.0, 4.0, 8.0), float, None,
         "core oversubscription: pod downlink capacity / core uplink capacity"),
    Knob("model", "replay", "model", ("llama-3.1-8b", "llama-2-7b", "llama-2-13b"), str, None,
         "model, i.e. KV bytes per token (netkv.perfmodel.MODELS); the scale grows with the KV bytes "
         "per token so the packets per transfer stay the base point's; every model serves the trace's "
         "lengths (model_context 'ignore': the knob is the KV size, not the model's context)",
         scale_factor_of=_kv_ratio, replay_settings=(("model_context", "ignore"),)),
)}


class SweepError(ExperimentError):
    """The sweep cannot run as asked; one clear line."""


def point_label(knob: Knob, value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._=-]", "_", f"{knob.key}={text}")


def point_experiment(base: ExperimentConfig, knob: Knob, value: Any, out: Path,
                     keep_schedulers: bool = False) -> ExperimentConfig:
    exp = replace(base, replay=dict(base.replay), testbed=json.loads(json.dumps(base.testbed)),
                  variants=json.loads(json.dumps(base.variants)),
                  out_dir=str(out / point_label(knob, value)), recorded={})
    exp.replay.update(dict(knob.replay_settings))
    if knob.section == "replay":
        exp.replay[knob.key] = value
    elif knob.section == "testbed":
        exp.testbed[knob.key] = value
    else:
        exp.testbed.setdefault("params", {})[knob.key] = value
    if knob.scale_factor_of is not None:
        try:
            factor = float(knob.scale_factor_of(value))
        except (KeyError, ValueError, TypeError):
            factor = 1.0  # an unknown value: prepare() refuses it with its own message
        base_scale = float(exp.testbed.get("scale", TestbedConfig().scale))
        exp.testbed["scale"] = base_scale * factor
    if knob.schedulers is not None and not keep_schedulers:
        exp.schedulers = list(knob.schedulers)
        exp.variants = {k: v for k, v in base.variants.items() if k in exp.schedulers}
    if not exp.window_starts_s:
        exp.window_starts_s = [float(exp.replay.get("start_s", 0.0))]
    return exp


def plan(base: ExperimentConfig, knob: Knob, values: list[Any], out: Path,
         keep_schedulers: bool = False) -> list[ExperimentConfig]:
    """Every point's experiment, each checked (prepare) before anything runs.
    A knob's own scheduler set replaces the base's unless ``keep_schedulers``."""
    if len(values) != len(set(map(str, values))):
        raise SweepError("a sweep value is listed twice")
    points = [point_experiment(base, knob, v, out, keep_schedulers) for v in values]
    for v, exp in zip(values, points):
        try:
            prepare(exp)
        except ExperimentError as exc:
            raise SweepError(f"{knob.key}={v}: {exc}") from None
    return points


def run_sweep(name: str, base: ExperimentConfig, values: list[Any], out: Path, *, quiet: bool = False,
              keep_schedulers: bool = False, engine: str = DEFAULT_ENGINE, jobs: int = 1) -> dict[str, Any]:
    knob = SWEEPS[name]
    if out.exists() and any(out.iterdir()):
        raise SweepError(f"sweep directory {out} exists and is not empty; choose another --out")
    points = plan(base, knob, values, out, keep_schedulers)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep-plan.json").write_text(json.dumps({
        "sweep": name, "knob": {"section": knob.section, "key": knob.key, "help": knob.help},
        "values": values, "points": [Path(p.out_dir).name for p in points], "engine": engine,
        "base": base.to_json()}, indent=2) + "\n")
    for k, (value, exp) in enumerate(zip(values, points)):
        if not quiet:
            print(f"netkv: sweep {name}: point {k + 1}/{len(points)}, {knob.key}={value}", flush=True)
        run_experiment(exp, quiet=quiet, engine=engine, jobs=jobs)
    return write_sweep(out)


def write_sweep(out: Path) -> dict[str, Any]:
    """sweep.json and sweep.png from the points' files."""
    plan_ = json.loads((out / "sweep-plan.json").read_text())
    names: list[str] = []
    rows = []
    for value, label in zip(plan_["values"], plan_["points"]):
        pdir = out / label
        if not (pdir / "experiment.json").is_file():
            rows.append({"value": value, "dir": label, "missing": True})
            continue
        campaign = write_campaign(pdir)
        for n in campaign["schedulers_order"]:
            if n not in names:
                names.append(n)
        rows.append({
            "value": value, "dir": label, "missing": False,
            "ttft_mean_ms": {n: campaign["schedulers"][n]["ttft_mean_ms"] for n in campaign["schedulers_order"]},
            # the same over every complete window: what the plot draws (hollow) where a replay was not inside
            "ttft_mean_ms_all_windows": {n: campaign["schedulers_all_windows"][n]["ttft_mean_ms"]
                                         for n in campaign["schedulers_order"]},
            "netkv_ttft_change_pct_all_windows": campaign["ttft_mean_change_pct_all_windows"].get("netkv", {}),
            "ttft_slo_attainment": {n: campaign["schedulers"][n]["ttft_slo_attainment"]
                                    for n in campaign["schedulers_order"]},
            "netkv_ttft_change_pct": campaign["ttft_mean_change_pct"].get("netkv", {}),
            "netkv_ttft_change_ms": campaign["ttft_mean_change_ms"].get("netkv", {}),
            "netkv_tbt_change_ms": campaign["tbt_mean_change_ms"].get("netkv", {}),
            # inside only when every replay of the point was judged inside (unjudged is not inside)
            "within_envelope": not campaign["outside_envelope"] and not campaign["unjudged"],
            "outside_envelope": campaign["outside_envelope"],
            "unjudged": campaign["unjudged"],
            "nothing_lost": campaign["nothing_lost"],
            "accounting": campaign["accounting"],
        })
    result = {"sweep": plan_["sweep"], "knob": plan_["knob"], "dir": str(out), "schedulers": names,
              "points": rows,
              "points_outside_envelope": [r["value"] for r in rows if not r["missing"] and not r["within_envelope"]],
              "nothing_lost": all(r.get("nothing_lost") for r in rows)}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_sweep(result, out)
    return result


def _xs(points: list[dict[str, Any]]) -> tuple[list[float], list[str] | None]:
    values = [p["value"] for p in points]
    if all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values], None
    return list(range(len(values))), [str(v) for v in values]  # type: ignore[return-value]


def plot_sweep(result: dict[str, Any], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if not p["missing"]]
    if not points:
        return None
    xs, labels = _xs(points)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    axes = list(axes.flat)
    panels = (("ttft_mean_ms", "mean TTFT (ms)"), ("ttft_slo_attainment", "TTFT SLO attainment"))
    for ax, (key, ylabel) in zip(axes, panels):
        for i, name in enumerate(result["schedulers"]):
            _series(ax, xs, [_drawn(p, key, name) for p in points], [p["within_envelope"] for p in points],
                    f"C{i}", name)
        ax.set_ylabel(ylabel)
    change_panels = (("netkv_ttft_change_pct", "NetKV mean TTFT change (%), paired by window"),
                     ("netkv_ttft_change_ms", "NetKV mean TTFT change (ms), paired by window"))
    for ax, (key, ylabel) in zip(axes[2:], change_panels):
        for i, name in enumerate(result["schedulers"]):
            if name == "netkv":
                continue
            _series(ax, xs, [_drawn(p, key, name) for p in points],
                    [p["within_envelope"] for p in points], f"C{i}", f"netkv vs {name}")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(ylabel)
    for ax in axes:
        ax.set_xlabel(result["knob"]["key"])
        if labels:
            ax.set_xticks(xs, labels, rotation=15)
        elif len(xs) > 2 and min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    title = f"sweep {result['sweep']}: 95% CI across windows; hollow: a replay outside the emulator's envelope"
    if result["points_outside_envelope"]:
        title += f" ({', '.join(map(str, result['points_outside_envelope']))})"
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _drawn(point: dict[str, Any], key: str, name: str) -> dict[str, Any] | None:
    """What the plot draws of a point: its headline figure where the point was
    inside the envelope, else the same figure over every complete window
    (drawn hollow), so that a point outside still shows where it lay."""
    if point["within_envelope"] or f"{key}_all_windows" not in point:
        return point[key].get(name)  # type: ignore[no-any-return]
    return point[f"{key}_all_windows"].get(name)  # type: ignore[no-any-return]


def _series(ax: Any, xs: list[float], summaries: list[dict[str, Any] | None], inside: list[bool],
            color: str, label: str) -> None:
    pts = [(x, s, ok) for x, s, ok in zip(xs, summaries, inside) if s and s.get("mean") is not None]
    if not pts:
        return
    ax.plot([p[0] for p in pts], [p[1]["mean"] for p in pts], color=color, label=label, linewidth=1)
    for x, s, ok in pts:
        err = [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]] if s.get("ci95") else None
        ax.errorbar([x], [s["mean"]], yerr=err, fmt="o", color=color, capsize=4, mfc=color if ok else "white")


def render_sweep(result: dict[str, Any]) -> str:
    lines = [f"sweep {result['sweep']} over {result['knob']['key']} ({result['dir']}); "
             "mean TTFT ms [95% CI across windows]"]
    head = f"{result['knob']['key']:>22s}" + "".join(f"{n:>26s}" for n in result["schedulers"])
    lines.append(head)
    for p in result["points"]:
        if p["missing"]:
            lines.append(f"{str(p['value']):>22s}  (not run)")
            continue
        cells = []
        for n in result["schedulers"]:
            s = p["ttft_mean_ms"].get(n) or {}
            cell = "-" if s.get("mean") is None else f"{s['mean']:.0f}" + (
                f" [{s['ci95'][0]:.0f}, {s['ci95'][1]:.0f}]" if s.get("ci95") else "")
            cells.append(f"{cell:>26s}")
        flag = "" if p["within_envelope"] else "  a replay OUTSIDE the envelope or unjudged (left out of its changes)"
        lines.append(f"{str(p['value']):>22s}" + "".join(cells) + flag)
        by_ms = p["netkv_ttft_change_ms"]
        changes = ", ".join(
            f"vs {b} {s['mean']:+.1f}% ({s['verdict']})"
            + (f" = {by_ms[b]['mean']:+.0f} ms [{by_ms[b]['ci95'][0]:+.0f}, {by_ms[b]['ci95'][1]:+.0f}]"
               if by_ms.get(b, {}).get("ci95") else "")
            for b, s in p["netkv_ttft_change_pct"].items() if s.get("mean") is not None)
        if changes:
            lines.append(f"{'':>22s}  netkv {changes}")
    lines.append("requests in = records out at every point" if result["nothing_lost"] else "PARTIAL: records missing")
    lines.append(f"files: {result['dir']}/sweep.json, sweep.png")
    return "\n".join(lines)
