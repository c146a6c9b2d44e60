"""A campaign: one experiment replayed over several disjoint trace windows.

``netkv run`` with ``window_starts_s`` writes one ordinary run directory per
window (``w<i>-<start>s/``, each with its own experiment.json, repeatable
alone) and, above them, ``campaign.json``: every headline figure as the mean
across windows with a 95% confidence interval (Student t, windows as the
samples) and the per-window values.  A change between two schedulers is paired
by window (the same requests, fabric and background flows) and is called
significant only when its interval excludes zero.

Everything is read back from the windows' files, so ``netkv report`` remakes a
campaign at any time, also of one that was interrupted (its missing windows
are listed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from lab.report import BREAKDOWN_PARTS, plot_attainment, plot_breakdown, ttft_breakdown_ms, write_report
from lab.rundir import window_runs
from lab.verdict import SIMULATED_NOTE, inside
from netkv import stats
from netkv.paper import PAPER_FIGURES, PAPER_SOURCE
from netkv.records import read_records
from netkv.slo import ttft_attainment_curve

# Per-scheduler figures carried across windows (from each window's comparison).
CAMPAIGN_METRICS = ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "ttft_slo_attainment",
                    "ttft_slo_attainment_length_aware", "tbt_mean_ms", "tbt_p99_ms", "tbt_slo_attainment",
                    "transfer_mean_ms", "decision_us_p50", "decision_us_p99", "decision_cpu_us_p99",
                    "decision_us_p99_unswitched", "idle_transfer_ratio_p90", "tcp_retransmit_rate", "queue_drops",
                    "oracle_ratio_p50", "oracle_ratio_p90")
BASELINES_FOR_PAPER = ("round_robin", "tuned_cache_load")
MIN_RESULT_WINDOWS = 2  # fewer windows inside the envelope than this: not a result
AA_SUFFIX = "@aa"  # a label that replays its scheduler a second time in every window (the noise floor)


def summary(values: list[float], left_out: list[str] | None = None) -> dict[str, Any]:
    """Mean, 95% interval across windows (netkv.stats.mean_ci), the values and
    the verdict, as JSON; "no data" without values.  ``left_out`` names the
    windows that were not used (outside the envelope, unjudged or partial);
    fewer than MIN_RESULT_WINDOWS used windows is not a result."""
    out: dict[str, Any]
    if not values:
        out = {"n": 0, "values": [], "mean": None, "ci95": None, "verdict": "no data"}
    else:
        ci = stats.mean_ci(values)
        out = {"n": ci.n, "values": [round(v, 4) for v in ci.values], "mean": round(ci.mean, 4),
               "ci95": None if ci.low is None or ci.high is None else [round(ci.low, 4), round(ci.high, 4)],
               "verdict": ci.verdict}
    if left_out is not None:
        out["windows_left_out"] = left_out
        if out["n"] < MIN_RESULT_WINDOWS:
            out["verdict"] = f"not a result: {out['n']} window(s) inside the envelope"
    return out


def is_campaign(run: Path) -> bool:
    return bool(json.loads((run / "experiment.json").read_text()).get("window_starts_s"))


def _pooled(windows: Iterable[Path], scheduler: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for w in windows:
        path = w / scheduler / "records.jsonl"
        if path.exists():
            out.extend(read_records(path))
    return out


def usable(m: dict[str, Any] | None) -> bool:
    """A replay that counts in a headline: complete and judged inside the envelope."""
    return m is not None and not m["partial"] and inside(m.get("verdict"))


def _paired(comparisons: list[dict[str, Any]], windows: list[str], a: str, b: str,
            value: Any, only_usable: bool) -> tuple[list[float], list[str]]:
    """One value per window for the pair (a, b), and the windows left out."""
    values, left = [], []
    for c, w in zip(comparisons, windows):
        ma, mb = c["schedulers"].get(a), c["schedulers"].get(b)
        if not ma or not mb or ma["partial"] or mb["partial"] or (only_usable and not (usable(ma) and usable(mb))):
            left.append(w)  # a partial replay's requests are not its window's
            continue
        v = value(c, ma, mb)
        if v is None:
            left.append(w)
        else:
            values.append(float(v))
    return values, left


def _pct(c: dict[str, Any], ma: dict[str, Any], mb: dict[str, Any]) -> float | None:
    if ma["ttft_mean_ms"] is None or not mb["ttft_mean_ms"]:
        return None
    return 100.0 * (ma["ttft_mean_ms"] / mb["ttft_mean_ms"] - 1)


def _key_diff(key: str, scale: float = 1.0) -> Any:
    def diff(c: dict[str, Any], ma: dict[str, Any], mb: dict[str, Any]) -> float | None:
        if ma.get(key) is None or mb.get(key) is None:
            return None
        return scale * (float(ma[key]) - float(mb[key]))
    return diff


def _common(field: str) -> Any:
    def get(c: dict[str, Any], ma: dict[str, Any], mb: dict[str, Any]) -> float | None:
        a, b = ma["_name"], mb["_name"]
        return ((c.get("ttft_mean_change_common") or {}).get(a, {}).get(b) or {}).get(field)
    return get


def aggregate(run: Path, comparisons: list[dict[str, Any]]) -> dict[str, Any]:
    """The campaign's figures.  Headline figures use only the windows in which
    every replay they compare was complete and judged inside the emulator's
    envelope (lab.verdict, re-judged under today's rule); the same figure over
    every complete window follows as a second line (``*_all_windows``), never
    first.  The headline TTFT change pairs the two schedulers on the requests
    both served (``ttft_mean_change_pct``); over each one's own served requests
    it is ``ttft_mean_change_pct_served``."""
    exp = json.loads((run / "experiment.json").read_text())
    names: list[str] = list(exp["schedulers"])
    starts = [float(v) for v in exp.get("window_starts_s", [])]
    done = window_runs(run)
    wnames = [w.name for w in done]
    for c in comparisons:
        for name, m in c["schedulers"].items():
            m["_name"] = name
    per: dict[str, Any] = {}
    per_all: dict[str, Any] = {}
    for name in names:
        rows = [(c["schedulers"].get(name), w) for c, w in zip(comparisons, wnames)]
        left = [w for m, w in rows if not usable(m)]
        per[name] = {key: summary([m[key] for m, _ in rows if usable(m) and m.get(key) is not None], left)
                     for key in CAMPAIGN_METRICS}
        per_all[name] = {key: summary([m[key] for m, _ in rows if m and not m["partial"] and m.get(key) is not None])
                         for key in CAMPAIGN_METRICS}
    figures: dict[str, tuple[Any, bool]] = {
        "ttft_mean_change_pct": (_common("pct"), True),
        "ttft_mean_change_ms": (_common("ms"), True),
        "ttft_mean_change_pct_served": (_pct, True),
        "ttft_slo_attainment_change_pp": (_key_diff("ttft_slo_attainment", 100.0), True),
        "tbt_mean_change_ms": (_key_diff("tbt_mean_ms"), True),
        "tbt_p99_change_ms": (_key_diff("tbt_p99_ms"), True),
        "ttft_mean_change_pct_all_windows": (_common("pct"), False),
        "ttft_slo_attainment_change_pp_all_windows": (_key_diff("ttft_slo_attainment", 100.0), False),
    }
    pairs: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in figures}
    for a in names:
        for b in names:
            if a == b:
                continue
            for key, (value, only_usable) in figures.items():
                values, left = _paired(comparisons, wnames, a, b, value, only_usable)
                pairs[key].setdefault(a, {})[b] = summary(values, left if only_usable else None)
    accounting = []
    outside, unjudged, rejudged = [], [], []
    simulated = 0
    for c, w in zip(comparisons, wnames):
        for name, m in c["schedulers"].items():
            accounting.append({"window": w, "scheduler": name, "records": m["requests"],
                               "requests_expected": m["requests_expected"],
                               "requests_without_record": m["requests_without_record"], "partial": m["partial"]})
            verdict = m.get("verdict") or {}
            simulated += verdict.get("note") == SIMULATED_NOTE
            entry = {"window": w, "scheduler": name, "limiting_resource": verdict.get("limiting_resource")}
            if verdict.get("within_envelope") is False:
                outside.append(entry)
            elif verdict.get("within_envelope") is None:
                unjudged.append(entry)
            if verdict.get("changed"):
                rejudged.append({**entry, "stored_within_envelope": verdict.get("stored_within_envelope"),
                                 "within_envelope": verdict.get("within_envelope")})
    for c in comparisons:
        for m in c["schedulers"].values():
            m.pop("_name", None)
    breakdown = {name: ttft_breakdown_ms(_pooled(done, name)) for name in names}
    curves = {name: [[t, f] for t, f in ttft_attainment_curve(_pooled(done, name))] for name in names}
    noise = {name[:-len(AA_SUFFIX)]: {"label": name, "ttft_mean_change_pct": pairs["ttft_mean_change_pct"][name][
        name[:-len(AA_SUFFIX)]], "ttft_mean_change_ms": pairs["ttft_mean_change_ms"][name][name[:-len(AA_SUFFIX)]]}
        for name in names if name.endswith(AA_SUFFIX) and name[:-len(AA_SUFFIX)] in names}
    return {
        "run_dir": str(run), "scenario": exp.get("scenario"), "schedulers_order": names,
        "windows": wnames, "window_starts_s": starts,
        "windows_missing": len(starts) - len(done),
        "window_length_s": exp.get("replay", {}).get("duration_s"),
        "replay_order_by_window": {w.name: _window_order(w) for w in done},
        "schedulers": per,
        "schedulers_all_windows": per_all,
        **pairs,
        "aa_noise_floor": noise,
        "ttft_breakdown_ms": breakdown,
        "ttft_slo_attainment_curve": curves,
        "accounting": accounting,
        "nothing_lost": all(not a["partial"] for a in accounting) and len(done) == len(starts),
        "outside_envelope": outside,
        "unjudged": unjudged,
        "simulated_replays": simulated,
        "verdict_changed_on_rejudging": rejudged,
        "versus_paper": versus_paper(names, pairs["ttft_mean_change_pct"], pairs["ttft_slo_attainment_change_pp"],
                                     per),
        "note": ("mean [95% CI] across windows (Student t); headline figures use only the windows whose replays "
                 "were all complete and judged inside the emulator's envelope (under today's rule), the same "
                 "figure over every complete window is *_all_windows; a change is paired by window and is the mean "
                 "of the per-window changes: (mean TTFT of row / of column - 1) x 100 over the requests both "
                 "served, negative is better (ttft_mean_change_pct_served: over each one's own served requests; "
                 "ttft_mean_change_ms: the same pairing as a difference in ms); significant only when its "
                 "interval excludes zero; fewer than 2 usable windows is not a result"),
    }


def _window_order(window: Path) -> list[str]:
    """The order the window's replays ran in (its experiment.json)."""
    try:
        return list(json.loads((window / "experiment.json").read_text()).get("schedulers", []))
    except (OSError, ValueError):
        return []


def versus_paper(names: list[str], changes: dict[str, Any], slo_changes: dict[str, Any],
                 per: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's headline figures beside ours (NetKV against each baseline)."""
    if "netkv" not in names:
        return []
    rows = []
    for base in BASELINES_FOR_PAPER:
        if base in names:
            paper = PAPER_FIGURES[f"ttft_mean_change_pct_vs_{base}"][0]
            rows.append({"figure": f"mean TTFT change vs {base} (%)", "paper": paper,
                         "testbed": changes["netkv"][base], "kind": "change"})
    for base in BASELINES_FOR_PAPER:
        if base in names:
            rows.append({"figure": f"TTFT SLO attainment change vs {base} (points)",
                         "paper": PAPER_FIGURES["slo_attainment_change_pp"][0],
                         "testbed": slo_changes["netkv"][base], "kind": "change"})
    rows.append({"figure": "NetKV decision p99, live, wall (ms)", "paper": PAPER_FIGURES["decision_overhead_ms_max"][0],
                 "testbed": _scaled(per["netkv"]["decision_us_p99"], 1e-3), "kind": "upper bound"})
    rows.append({"figure": "NetKV decision p99, live, CPU (ms)", "paper": PAPER_FIGURES["decision_overhead_ms_max"][0],
                 "testbed": _scaled(per["netkv"]["decision_cpu_us_p99"], 1e-3), "kind": "upper bound"})
    rows.append({"figure": "NetKV decision p99, live, wall, decisions not switched out (ms)",
                 "paper": PAPER_FIGURES["decision_overhead_ms_max"][0],
                 "testbed": _scaled(per["netkv"]["decision_us_p99_unswitched"], 1e-3), "kind": "upper bound"})
    return rows


def _scaled(summary: dict[str, Any], factor: float) -> dict[str, Any]:
    out = dict(summary)
    for key in ("mean",):
        if out.get(key) is not None:
            out[key] = round(out[key] * factor, 4)
    if out.get("ci95"):
        out["ci95"] = [round(v * factor, 4) for v in out["ci95"]]
    out["values"] = [round(v * factor, 4) for v in out.get("values", [])]
    return out


def write_campaign(run: Path) -> dict[str, Any]:
    comparisons = [write_report(w) for w in window_runs(run)]
    campaign = aggregate(run, comparisons)
    (run / "campaign.json").write_text(json.dumps(campaign, indent=2) + "\n")
    plot_campaign(campaign, run)
    return campaign


def plot_campaign(campaign: dict[str, Any], run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = campaign["schedulers_order"]
    if not names:
        return []
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for i, name in enumerate(names):
        s = campaign["schedulers"][name]["ttft_mean_ms"]
        if s["mean"] is None:
            continue
        err = [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]] if s.get("ci95") else None
        ax.bar(i, s["mean"], yerr=err, capsize=6, color=f"C{i}", alpha=0.7)
        ax.plot([i] * len(s["values"]), s["values"], "k.", markersize=6)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("mean TTFT (ms)")
    ax.set_title(f"mean TTFT, 95% CI over {len(campaign['windows'])} windows (dots: windows)")
    plot_breakdown(axes[0][1], {n: campaign["ttft_breakdown_ms"][n] for n in names}, BREAKDOWN_PARTS)
    plot_attainment(axes[1][0], {n: campaign["ttft_slo_attainment_curve"][n] for n in names})
    ax = axes[1][1]
    base = [b for b in BASELINES_FOR_PAPER if b in names]
    rows = [(a, b) for a in names for b in base if a != b]
    for k, (a, b) in enumerate(rows):
        s = campaign["ttft_mean_change_pct"][a][b]
        if s["mean"] is None:
            continue
        hollow = s.get("verdict") != "significant"
        err = [[s["mean"] - s["ci95"][0]], [s["ci95"][1] - s["mean"]]] if s.get("ci95") else None
        ax.errorbar(k, s["mean"], yerr=err, fmt="o", capsize=6, color=f"C{names.index(a)}",
                    mfc="white" if hollow else f"C{names.index(a)}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{a}\nvs {b}" for a, b in rows], fontsize=7)
    ax.set_ylabel("mean TTFT change (%)")
    ax.set_title("paired change, 95% CI (hollow: not significant)")
    title = f"campaign, scenario {campaign['scenario']}, {len(campaign['windows'])} windows"
    if campaign["outside_envelope"]:
        title += f"  ({len(campaign['outside_envelope'])} replays OUTSIDE envelope)"
    fig.suptitle(title)
    fig.tight_layout()
    path = run / "campaign.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _fmt_summary(s: dict[str, Any], digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean']:+.{digits}f}" if s.get("signed") else f"{s['mean']:.{digits}f}"
    if s.get("ci95"):
        text += f" [{s['ci95'][0]:.{digits}f}, {s['ci95'][1]:.{digits}f}]"
    return text


def render_campaign(campaign: dict[str, Any]) -> str:
    names = campaign["schedulers_order"]
    lines = [f"campaign {campaign['run_dir']}: scenario {campaign['scenario']}, "
             f"{len(campaign['windows'])} window(s) of {campaign['window_length_s']} s "
             f"(starts {', '.join(f'{v:g}' for v in campaign['window_starts_s'])} s); "
             "mean [95% CI] across windows"]
    cols = [("ttft_mean_ms", "TTFT mean ms", 0), ("ttft_p99_ms", "TTFT p99 ms", 0),
            ("ttft_slo_attainment", "SLO att.", 3), ("tbt_mean_ms", "TBT mean ms", 2), ("tbt_p99_ms", "TBT p99 ms", 1),
            ("decision_us_p99", "decide p99 us", 0), ("decision_cpu_us_p99", "decide cpu p99 us", 0)]
    width = max([22] + [len(n) + 1 for n in names])
    lines.append(f"{'scheduler':{width}s}" + "".join(f"{h:>24s}" for _, h, _ in cols))
    for name in names:
        m = campaign["schedulers"][name]
        left = m["ttft_mean_ms"].get("windows_left_out") or []
        lines.append(f"{name:{width}s}" + "".join(f"{_fmt_summary(m[k], d):>24s}" for k, _, d in cols)
                     + (f"  (without {', '.join(left)})" if left else ""))
    for base, aa in campaign.get("aa_noise_floor", {}).items():
        s = aa["ttft_mean_change_pct"]
        lines.append(f"noise floor (A/A: {base} replayed twice per window): mean TTFT "
                     f"{_fmt_summary({**s, 'signed': True})}% ({s.get('verdict', '-')})")
    if "netkv" in names:
        for b, s in campaign["ttft_mean_change_pct"]["netkv"].items():
            pp = campaign["ttft_slo_attainment_change_pp"]["netkv"][b]
            ms = campaign["ttft_mean_change_ms"]["netkv"].get(b)
            tbt = campaign["tbt_mean_change_ms"]["netkv"][b]
            allw = campaign["ttft_mean_change_pct_all_windows"]["netkv"][b]
            in_ms = f" = {_fmt_summary({**ms, 'signed': True})} ms" if ms and ms.get("mean") is not None else ""
            lines.append(f"netkv vs {b}: mean TTFT {_fmt_summary({**s, 'signed': True})}%{in_ms} "
                         f"({s.get('verdict', '-')}); SLO attainment {_fmt_summary({**pp, 'signed': True})} points "
                         f"({pp.get('verdict', '-')}); TBT mean {_fmt_summary({**tbt, 'signed': True}, 2)} ms "
                         f"({tbt.get('verdict', '-')}); per window {', '.join(f'{v:+.1f}%' for v in s['values'])}")
            if s.get("windows_left_out"):
                lines.append(f"  {'':14s}left out: {', '.join(s['windows_left_out'])}; with every window: mean TTFT "
                             f"{_fmt_summary({**allw, 'signed': True})}% ({allw.get('verdict', '-')})")
    if campaign["versus_paper"]:
        lines.append(f"beside the paper ({PAPER_SOURCE}):")
        for row in campaign["versus_paper"]:
            if row.get("kind") == "upper bound":
                lines.append(f"  {row['figure']:52s} paper < {row['paper']:.1f}   testbed "
                             f"{_fmt_summary(row['testbed'], 2)}")
            else:
                lines.append(f"  {row['figure']:52s} paper {row['paper']:+.1f}   testbed "
                             f"{_fmt_summary({**row['testbed'], 'signed': True}, 1)} "
                             f"({row['testbed'].get('verdict', '-')})")
    lost = [a for a in campaign["accounting"] if a["partial"]]
    lines.append("requests in = records out for every replay" if campaign["nothing_lost"] else
                 f"PARTIAL: {len(lost)} replays lack records, {campaign['windows_missing']} windows missing")
    if campaign["outside_envelope"]:
        lines.append("OUTSIDE the emulator's envelope (left out of the headline): " + ", ".join(
            f"{o['window']}/{o['scheduler']} ({o['limiting_resource']})" for o in campaign["outside_envelope"]))
    if campaign.get("unjudged"):
        lines.append("UNJUDGED (left out of the headline): " + ", ".join(
            f"{o['window']}/{o['scheduler']} ({o['limiting_resource']})" for o in campaign["unjudged"]))
    simulated = campaign.get("simulated_replays", 0)
    if simulated and simulated == len(campaign["accounting"]):
        lines.append("simulated replays: no emulator envelope applies (docs/simulator.md)")
    elif not campaign["outside_envelope"] and not campaign.get("unjudged"):
        lines.append("every replay inside the emulator's envelope"
                     + (f" ({simulated} of them simulated: no envelope applies)" if simulated else ""))
    for o in campaign.get("verdict_changed_on_rejudging", []):
        lines.append(f"re-judged under today's rule: {o['window']}/{o['scheduler']} was "
                     f"{o['stored_within_envelope']} when it ran, is {o['within_envelope']} now "
                     f"({o['limiting_resource']})")
    lines.append(f"files: {campaign['run_dir']}/campaign.json, campaign.png")
    return "\n".join(lines)


PAIR_FIGURES = (("ttft_mean_change_pct", "mean TTFT", "%", 1), ("ttft_mean_change_ms", "=", " ms", 0),
                ("ttft_slo_attainment_change_pp", "SLO", " points", 1), ("tbt_mean_change_ms", "TBT mean", " ms", 2),
                ("tbt_p99_change_ms", "TBT p99", " ms", 1))


def render_pairs(campaign: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """Paired changes of A against B, one line each: the headline figures with
    their verdicts, the every-window TTFT change, and the A/A noise floor."""
    lines = []
    for base, aa in campaign.get("aa_noise_floor", {}).items():
        s = aa["ttft_mean_change_pct"]
        lines.append(f"noise floor, {aa['label']} vs {base}: mean TTFT {_fmt_summary({**s, 'signed': True})}% "
                     f"({s.get('verdict', '-')})")
    for a, b in pairs:
        cells = []
        for key, label, unit, digits in PAIR_FIGURES:
            s = campaign[key][a][b]
            cells.append(f"{label} {_fmt_summary({**s, 'signed': True}, digits)}{unit} ({s.get('verdict', '-')})")
        every = campaign["ttft_mean_change_pct_all_windows"][a][b]
        left = campaign["ttft_mean_change_pct"][a][b].get("windows_left_out") or []
        lines.append(f"{a} vs {b}: " + "; ".join(cells))
        if left:
            lines.append(f"  left out {', '.join(left)}; every window: mean TTFT "
                         f"{_fmt_summary({**every, 'signed': True})}% ({every.get('verdict', '-')})")
    return "\n".join(lines)
