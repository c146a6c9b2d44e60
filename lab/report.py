"""``netkv report RUN_DIR``: the comparison of a run, made from its files.

Everything is read back from disk (experiment.json, each scheduler's
records.jsonl and envelope.json), never from a run's memory, so a report can be
remade at any time, also of a run that was interrupted.

Per scheduler: request counts, TTFT (mean, p50, p99) and SLO attainment over
every request that entered (failed ones count as misses), time between tokens,
KV transfer time, the transfer's ratio to its ideal (its payload at the path's
nominal bottleneck rate, i.e. what it would take alone on an idle fabric), the
same ratio for transfers on idle paths only, overall and per tier distance
(the emulator's fidelity: on a path that no other transfer and no background
flow used, the modelled network adds nothing, so what is left is the
emulator's own cost), the tier distance of the chosen prefill/decode pairs, decision
latency (wall, and the frontend thread's CPU time: their gap is time off the
CPU), and the switch process's CPU (the emulator's envelope).  Then, for every
scheduler, the change of its mean TTFT against each other one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import topologies
from fabric.config import TestbedConfig
from lab import transfers
from lab.rundir import NETWORK_FILE, TELEMETRY_SERIES, read_json
from lab.verdict import describe, judge_replay
from netkv.records import read_records
from netkv.serving.config import ReplayConfig, ReplayConfigError
from netkv.slo import SloConfig, slo_summary
from netkv.stats import percentile
from netkv.traces import TraceError


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


def tp_ranks(run_dir: Path) -> dict[str, list[str]] | None:
    """A tensor-parallel replay's instances (rank-0 host -> GPU hosts), from its
    run.json's placement; None for one GPU per instance or without the file."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    ranks = (info.get("placement") or {}).get("ranks") if isinstance(info, dict) else None
    return ranks if isinstance(ranks, dict) and ranks else None


def scheduler_metrics(run_dir: Path, topo: topologies.Topology, scale: float, mtu_bytes: int,
                      slo_ms: float | None,
                      background: list[transfers.Background] | None = None) -> dict[str, Any]:
    records = read_records(run_dir / "records.jsonl")
    ranks = tp_ranks(run_dir)  # a TP transfer is tp rank flows: its ideal time and path are theirs
    ok = [r for r in records if r.get("status") == "ok"]
    ttft = [float(r["ttft_ms"]) for r in ok]
    transfer = [float(r["transfer_end_ms"]) - float(r["transfer_start_ms"]) for r in ok]
    ratios, by_tier_ms, tiers = [], {}, {}  # type: ignore[var-annotated]
    for r in ok:
        t = int(r["tier_distance"])
        tiers[t] = tiers.get(t, 0) + 1
        ms = float(r["transfer_end_ms"]) - float(r["transfer_start_ms"])
        by_tier_ms.setdefault(t, []).append(ms)
        if r["prefill"] != r["decode"] and int(r.get("bytes_sent") or 0) > 0:
            ratios.append(ms / transfers.ideal_ms(topo, scale, r, ranks))
    idle = transfers.idle_transfers(topo, scale, mtu_bytes, records, background=background or [], ranks=ranks)
    priced = transfers.priced_transfers(topo, records, background=background or [], ranks=ranks)
    idle_ratios = transfers.ratios(idle)
    idle_by_tier: dict[int, list[float]] = {}
    for xfer in idle:
        idle_by_tier.setdefault(xfer.tier_distance, []).append(xfer.ratio)
    decision = [float(r["decision_us"]) for r in records if r.get("decision_us") is not None]
    # Records written before these fields existed lack them (None here).
    decision_cpu = [float(r["decision_cpu_us"]) for r in records if r.get("decision_cpu_us") is not None]
    views_build = [float(r["views_build_us"]) for r in records if r.get("views_build_us") is not None]
    # Decisions the thread ran through without a context switch or a collection:
    # their wall time is the decision's own, whatever else shared the machine.
    switched = [r for r in records if r.get("decision_preemptions") is not None]
    unswitched = [float(r["decision_us"]) for r in switched if r["decision_preemptions"] == 0
                  and r.get("decision_waits") == 0 and not r.get("decision_gc_us")]
    tbt = [float(r["tbt_mean_ms"]) for r in ok if r.get("tbt_mean_ms") is not None]
    tbt_p99 = [float(r["tbt_p99_ms"]) for r in ok if r.get("tbt_p99_ms") is not None]
    reasons: dict[str, int] = {}
    for r in records:
        if r.get("status") != "ok":
            key = str(r.get("reason", "")).split(":")[0] or "unknown"
            reasons[key] = reasons.get(key, 0) + 1
    out: dict[str, Any] = {
        "requests": len(records), "ok": len(ok), "failed": len(records) - len(ok), "failure_reasons": reasons,
        "ttft_mean_ms": _round(_mean(ttft)), "ttft_p50_ms": _round(percentile(ttft, 50)),
        "ttft_p99_ms": _round(percentile(ttft, 99)),
        "tbt_mean_ms": _round(_mean(tbt), 3),
        # the 99th percentile, over the requests, of each request's own p99 time between tokens
        "tbt_p99_ms": _round(percentile(tbt_p99, 99), 3),
        "transfer_mean_ms": _round(_mean(transfer)), "transfer_p99_ms": _round(percentile(transfer, 99)),
        "transfer_ratio_p50": _round(percentile(ratios, 50), 3),
        "transfer_ratio_p99": _round(percentile(ratios, 99), 3),
        "idle_transfers": len(idle),
        "idle_transfer_ratio_p50": _round(percentile(idle_ratios, 50), 3),
        "idle_transfer_ratio_p90": _round(percentile(idle_ratios, 90), 3),
        "idle_transfers_by_tier": {str(t): len(v) for t, v in sorted(idle_by_tier.items())},
        "idle_transfer_ratio_p90_by_tier": {str(t): _round(percentile(v, 90), 3)
                                            for t, v in sorted(idle_by_tier.items())},
        "transfer_mean_ms_by_tier": {str(t): _round(_mean(v)) for t, v in sorted(by_tier_ms.items())},
        "pairs_by_tier": {str(t): n for t, n in sorted(tiers.items())},
        "decision_us_p50": _round(percentile(decision, 50)), "decision_us_p99": _round(percentile(decision, 99)),
        "ttft_breakdown_ms": ttft_breakdown_ms(records),
        "decision_cpu_us_p50": _round(percentile(decision_cpu, 50)),
        "decision_cpu_us_p99": _round(percentile(decision_cpu, 99)),
        "views_build_us_p99": _round(percentile(views_build, 99)),
        "decision_us_p99_unswitched": _round(percentile(unswitched, 99)),
        "decisions_preempted": sum(1 for r in switched if r["decision_preemptions"]) if switched else None,
        "decisions_waited": sum(1 for r in switched if r.get("decision_waits")) if switched else None,
        "decisions_with_gc": sum(1 for r in switched if r.get("decision_gc_us")) if switched else None,
    }
    slo = slo_summary(records, _slo_config(run_dir))
    out["ttft_slo_attainment_curve"] = slo["ttft_attainment_curve"]
    out["ttft_slo_attainment_length_aware"] = _round(slo["length_aware_ttft_attainment"], 4)
    out["tbt_slo_attainment"] = _round(slo["tbt_attainment"], 4)
    out["slo_settings"] = slo["settings"]
    if slo_ms is not None:
        out["ttft_slo_ms"] = slo_ms
        out["ttft_slo_attainment"] = _round(sum(1 for v in ttft if v <= slo_ms) / len(records), 4) \
            if records else None
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        out["problems"] = json.loads(summary_path.read_text()).get("problems", [])
    else:
        out["problems"] = ["no summary.json: the replay did not finish"]
    expected, why = window_size_or_why(run_dir)
    missing = None if expected is None else max(0, expected - len(records))
    out["requests_expected"] = expected
    out["requests_without_record"] = missing
    # without its config.json the window is unknown, so nothing says the records are all of it
    unreadable = why.startswith("config.json")
    out["partial"] = not summary_path.exists() or bool(missing) or unreadable
    if missing:
        out["problems"].append(f"partial: {missing} of the window's {expected} requests have no record")
    if unreadable:
        out["problems"].append("partial: config.json cannot be read, so the window's size is unknown")
    elif expected is None:
        out["window_size_unknown"] = why  # the summary's own count stands; the report cannot recount it
    env_path = run_dir / "envelope.json"
    out["envelope"] = json.loads(env_path.read_text()) if env_path.exists() else None
    out["oracle_vs_fabric"] = oracle_error(priced)
    out["oracle_ratio_p50"] = (out["oracle_vs_fabric"].get("all") or {}).get("ratio_p50")
    out["oracle_ratio_p90"] = (out["oracle_vs_fabric"].get("all") or {}).get("ratio_p90")
    network = read_json(run_dir / NETWORK_FILE) or {}
    out["tcp_retransmit_rate"] = network.get("tcp_retransmit_rate")
    out["tcp_segments_retransmitted"] = network.get("tcp_segments_retransmitted")
    out["queue_drops"] = network.get("queue_drops")
    out["queue_drops_by_tier"] = network.get("queue_drops_by_tier")
    out["verdict"] = judge_replay(run_dir)  # the envelope judged again under today's rule (lab.verdict)
    out.update(fault_figures(run_dir, records))
    return out


def oracle_error(priced: list[transfers.Priced]) -> dict[str, Any]:
    """The oracle's estimate at decision time against the measured transfer
    time: measured / estimated, its median (the bias) and 10th-90th
    percentiles (the spread), over all priced transfers, by tier distance and
    by whether a background flow shared the path."""
    def stats(rows: list[transfers.Priced]) -> dict[str, Any]:
        ratios = [p.ratio for p in rows]
        return {"n": len(rows), "ratio_p50": _round(percentile(ratios, 50), 3),
                "ratio_p10": _round(percentile(ratios, 10), 3), "ratio_p90": _round(percentile(ratios, 90), 3)}

    groups: dict[str, list[transfers.Priced]] = {}
    for p in priced:
        groups.setdefault(f"tier {p.tier_distance}, {'background on path' if p.loaded else 'no background'}",
                          []).append(p)
    return {"all": stats(priced), **{k: stats(v) for k, v in sorted(groups.items())}} if priced else {}


# What a fault event's record says about the system's answer to it (lab.faults).
FAULT_FIGURES = ("event_to_routes_ms", "detected_ms", "requests_failed", "routes_ready_ms",
                 "telemetry_resumed_ms", "back_t_s")


def fault_figures(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The replay's fault events (events.jsonl) in short, and its TTFT before
    the first event and from it on, so schedulers can be compared under faults
    (and how TTFT recovers).  Empty when the replay had no events."""
    path = run_dir / "events.jsonl"
    if not path.exists():
        return {}
    events = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "restore":
            continue
        short = {k: rec.get(k) for k in ("kind", "requested_t_s", "actual_t_s", "outcome")}
        short.update({k: rec[k] for k in FAULT_FIGURES if rec.get(k) is not None})
        events.append(short)
    first_ms = min((1000 * float(e["actual_t_s"]) for e in events if e.get("actual_t_s") is not None), default=None)
    ok = [r for r in records if r["status"] == "ok" and r.get("ttft_ms") is not None]
    before = [float(r["ttft_ms"]) for r in ok if first_ms is not None and r["arrival_ms"] < first_ms]
    after = [float(r["ttft_ms"]) for r in ok if first_ms is not None and r["arrival_ms"] >= first_ms]
    return {"fault_events": events,
            "ttft_mean_ms_before_faults": _round(_mean(before)), "ttft_mean_ms_from_first_fault": _round(_mean(after)),
            "failed_from_first_fault": sum(1 for r in records if r["status"] != "ok" and first_ms is not None
                                           and r["arrival_ms"] >= first_ms)}


# Where a request's TTFT goes: consecutive record timestamps, so the parts add
# up to first_token_ms - arrival_ms.
BREAKDOWN_PARTS: tuple[tuple[str, str, str], ...] = (
    ("prefill queue", "arrival_ms", "prefill_start_ms"),
    ("prefill", "prefill_start_ms", "prefill_end_ms"),
    ("KV transfer", "prefill_end_ms", "transfer_end_ms"),
    ("decode queue", "transfer_end_ms", "decode_admit_ms"),
    ("first step", "decode_admit_ms", "first_token_ms"),
)
def ttft_breakdown_ms(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean of each part of TTFT (BREAKDOWN_PARTS) over the ok records."""
    ok = [r for r in records if r.get("status") == "ok"]
    out: dict[str, float | None] = {}
    for part, a, b in BREAKDOWN_PARTS:
        out[part] = _round(_mean([float(r[b]) - float(r[a]) for r in ok]))
    return out


def plot_breakdown(ax: Any, breakdown: dict[str, dict[str, float | None]],
                   parts: tuple[tuple[str, str, str], ...] = BREAKDOWN_PARTS) -> None:
    names = list(breakdown)
    bottom = [0.0] * len(names)
    for part, _, _ in parts:
        heights = [breakdown[n].get(part) or 0.0 for n in names]
        ax.bar(range(len(names)), heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("mean ms per ok request")
    ax.set_title("where TTFT goes")
    ax.legend(fontsize=8)


def plot_attainment(ax: Any, curves: dict[str, list[list[float]]]) -> None:
    for name, curve in curves.items():
        pts = [c for c in curve if c[1] is not None]
        if pts:
            ax.plot([c[0] for c in pts], [c[1] for c in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT SLO threshold (ms)")
    ax.set_ylabel("fraction of requests within it")
    ax.set_title("TTFT SLO attainment vs threshold (failed = miss)")
    ax.legend(fontsize=8)


def _slo_config(run_dir: Path) -> SloConfig | None:
    """The SLO settings the replay ran with (its config.json), or the defaults."""
    try:
        return SloConfig.from_dict(json.loads((run_dir / "config.json").read_text()).get("slo") or {})
    except (OSError, ValueError, AttributeError):
        return None


def window_size(run_dir: Path) -> int | None:
    """How many requests the replay's window holds, from the replay's own
    config.json (None when it cannot be read back)."""
    return window_size_or_why(run_dir)[0]


def window_size_or_why(run_dir: Path) -> tuple[int | None, str]:
    """The window's size, or None and why: an unreadable config.json (then
    nothing says the records are the whole window), or a trace that cannot be
    read here (a run reported from another checkout, or a moved trace)."""
    try:
        cfg = ReplayConfig.load(run_dir / "config.json")
    except (ReplayConfigError, OSError) as exc:
        return None, f"config.json cannot be read ({exc})"
    try:
        return len(cfg.window().requests), ""
    except (TraceError, OSError) as exc:
        return None, f"the trace cannot be read here ({exc})"


def ok_ttft_by_request(path: Path) -> dict[str, float]:
    """TTFT of every request a replay served, by request id."""
    return {str(r["request_id"]): float(r["ttft_ms"]) for r in read_records(path) if r.get("status") == "ok"
            and r.get("ttft_ms") is not None} if path.exists() else {}


def common_request_change(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """A's mean TTFT against B's over the requests both served: the change in
    % and in ms, and how many requests that is (where the two failed
    different requests, their plain means are over different requests)."""
    ids = a.keys() & b.keys()
    if not ids:
        return {"requests": 0, "pct": None, "ms": None}
    mean_a = sum(a[i] for i in ids) / len(ids)
    mean_b = sum(b[i] for i in ids) / len(ids)
    return {"requests": len(ids), "only_a": len(a.keys() - ids), "only_b": len(b.keys() - ids),
            "pct": _round(100.0 * (mean_a / mean_b - 1), 3) if mean_b else None, "ms": _round(mean_a - mean_b, 2)}


def compare(run: Path) -> dict[str, Any]:
    exp = json.loads((run / "experiment.json").read_text())
    tb_cfg = TestbedConfig.from_json(exp["testbed"])
    topo = tb_cfg.validate()
    slo = exp.get("replay", {}).get("ttft_slo_ms")
    scen_path = run / "scenario.json"
    flows = json.loads(scen_path.read_text()).get("flows", []) if scen_path.exists() else []
    background = transfers.background_of(topo, flows)
    per: dict[str, Any] = {}
    for name in exp["schedulers"]:
        if (run / name / "records.jsonl").exists():
            per[name] = scheduler_metrics(run / name, topo, tb_cfg.scale, tb_cfg.mtu_bytes, slo, background)
    changes: dict[str, dict[str, float | None]] = {}
    common: dict[str, dict[str, dict[str, Any]]] = {}
    ttft = {name: ok_ttft_by_request(run / name / "records.jsonl") for name in per}
    for a, ma in per.items():
        for b, mb in per.items():
            # a partial replay's requests are not the window's: no comparison with it
            if a == b or ma["ttft_mean_ms"] is None or not mb["ttft_mean_ms"] or ma["partial"] or mb["partial"]:
                continue
            changes.setdefault(a, {})[b] = _round(100.0 * (ma["ttft_mean_ms"] / mb["ttft_mean_ms"] - 1), 2)
            common.setdefault(a, {})[b] = common_request_change(ttft[a], ttft[b])
    outside = [s for s, m in per.items() if m["verdict"]["within_envelope"] is False]
    unjudged = [s for s, m in per.items() if m["verdict"]["within_envelope"] is None]
    rejudged = {s: m["verdict"] for s, m in per.items() if m["verdict"]["changed"]}
    return {"run_dir": str(run), "scenario": exp.get("scenario"), "topology": topo.name,
            "scale": tb_cfg.scale, "schedulers": per,
            "ttft_mean_change_pct": changes,
            "ttft_mean_change_common": common,
            "outside_envelope": outside,
            "unjudged": unjudged,
            "verdict_changed_on_rejudging": rejudged,
            "note": ("TTFT change: (mean TTFT of row / mean TTFT of column - 1) x 100; negative is better. "
                     "transfer_ratio: measured / ideal on the nominal path bottleneck.")}


def plot(comparison: dict[str, Any], run: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(comparison["schedulers"])
    if not names:
        return []
    fig, axes = plt.subplots(2, 3, figsize=(18, 8))
    ax = axes[0][0]
    for name in names:
        recs = [r for r in read_records(run / name / "records.jsonl") if r.get("status") == "ok"]
        values = sorted(float(r["ttft_ms"]) for r in recs)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=name)
    slo = next((m.get("ttft_slo_ms") for m in comparison["schedulers"].values() if m.get("ttft_slo_ms")), None)
    if slo:
        ax.axvline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} ms")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of ok requests")
    ax.set_title("TTFT distribution")
    ax.legend()
    ax = axes[0][1]
    x = range(len(names))
    means = [comparison["schedulers"][n]["ttft_mean_ms"] or 0 for n in names]
    p99 = [comparison["schedulers"][n]["ttft_p99_ms"] or 0 for n in names]
    ax.bar([i - 0.2 for i in x], means, width=0.4, label="mean")
    ax.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("TTFT by scheduler")
    ax.legend()
    ax = axes[1][0]
    tiers = sorted({t for n in names for t in comparison["schedulers"][n]["transfer_mean_ms_by_tier"]})
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        by = comparison["schedulers"][name]["transfer_mean_ms_by_tier"]
        ax.bar([i + k * width for i in range(len(tiers))], [by.get(t) or 0 for t in tiers], width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tiers))], [f"tier {t}" for t in tiers])
    ax.set_ylabel("mean KV transfer (ms)")
    ax.set_title("KV transfer time by P-D tier distance")
    ax.legend()
    ax = axes[1][1]
    bottom = [0.0] * len(names)
    for t in tiers:
        counts = []
        for name in names:
            m = comparison["schedulers"][name]
            counts.append(m["pairs_by_tier"].get(t, 0) / max(1, m["ok"]))
        ax.bar(list(x), counts, bottom=bottom, label=f"tier {t}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xticks(list(x), names, rotation=15)
    ax.set_ylabel("share of requests")
    ax.set_title("Tier distance of chosen prefill/decode pairs")
    ax.legend()
    plot_breakdown(axes[0][2], {n: comparison["schedulers"][n]["ttft_breakdown_ms"] for n in names})
    plot_attainment(axes[1][2], {n: comparison["schedulers"][n]["ttft_slo_attainment_curve"] for n in names})
    title = f"{comparison['topology']}, scenario {comparison['scenario']}, scale 1:{comparison['scale']:g}"
    if comparison["outside_envelope"]:
        title += f"  (OUTSIDE envelope: {', '.join(comparison['outside_envelope'])})"
    fig.suptitle(title)
    fig.tight_layout()
    path = run / "comparison.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    heat = plot_utilisation(comparison, run)
    priced = plot_oracle(comparison, run)
    return [path] + ([heat] if heat else []) + ([priced] if priced else [])


def plot_oracle(comparison: dict[str, Any], run: Path) -> Path | None:
    """The oracle against the fabric: measured over estimated transfer time of
    every priced transfer, by tier distance, with and without a background
    flow on its path (one panel per scheduler that priced its transfers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exp = json.loads((run / "experiment.json").read_text())
    topo = TestbedConfig.from_json(exp["testbed"]).validate()
    scen_path = run / "scenario.json"
    background = transfers.background_of(topo, json.loads(scen_path.read_text()).get("flows", [])
                                         if scen_path.exists() else [])
    panels = {}
    for name in comparison["schedulers"]:
        priced = transfers.priced_transfers(topo, read_records(run / name / "records.jsonl"), background=background,
                                            ranks=tp_ranks(run / name))
        if priced:
            panels[name] = priced
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    for ax, (name, priced) in zip(axes[0], panels.items()):
        for tier in sorted({p.tier_distance for p in priced}):
            for loaded, marker in ((False, "o"), (True, "x")):
                pts = [p for p in priced if p.tier_distance == tier and p.loaded == loaded]
                if pts:
                    ax.scatter([p.estimate_ms for p in pts], [p.measured_ms for p in pts], s=12, marker=marker,
                               color=f"C{tier}", label=f"tier {tier}" + (", background on path" if loaded else ""))
        lo = min(min(p.estimate_ms, p.measured_ms) for p in priced)
        hi = max(max(p.estimate_ms, p.measured_ms) for p in priced)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("oracle's estimate at decision time (ms)")
        ax.set_ylabel("measured transfer (ms)")
        ax.set_title(f"{name}: the oracle against the fabric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = run / "oracle.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_utilisation(comparison: dict[str, Any], run: Path) -> Path | None:
    """Link utilisation over time, one heatmap per scheduler: a row per
    directed link, grouped by tier (GPU links at the bottom, core on top),
    a column per telemetry poll, from each replay's telemetry.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    exp = json.loads((run / "experiment.json").read_text())
    topo = TestbedConfig.from_json(exp["testbed"]).validate()
    series = {n: read_series(run / n / TELEMETRY_SERIES) for n in comparison["schedulers"]}
    series = {n: v for n, v in series.items() if v}
    if not series:
        return None
    links = sorted({(l[0], l[1]) for polls in series.values() for _, rows in polls for l in rows},
                   key=lambda k: (_tier_of(topo, k), k))
    index = {k: i for i, k in enumerate(links)}
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 6), squeeze=False)
    for ax, (name, polls) in zip(axes[0], series.items()):
        grid = np.full((len(links), len(polls)), np.nan)
        for j, (_, rows) in enumerate(polls):
            for l in rows:
                grid[index[(l[0], l[1])], j] = float(l[2])
        t0 = polls[0][0]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0,
                       extent=(0.0, polls[-1][0] - t0 or 1.0, 0, len(links)), interpolation="nearest")
        bounds: dict[int, list[int]] = {}
        for k, i in index.items():
            bounds.setdefault(_tier_of(topo, k), []).append(i)
        ax.set_yticks([sum(v) / len(v) for v in bounds.values()], [f"tier {t}" for t in bounds])
        for v in bounds.values():
            ax.axhline(max(v) + 1, color="white", linewidth=0.6)
        ax.set_xlabel("s since the first poll")
        ax.set_title(f"{name}: link utilisation")
    fig.colorbar(im, ax=list(axes[0]), label="utilisation (load / rate)")
    path = run / "utilisation.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_series(path: Path) -> list[tuple[float, list[list[Any]]]]:
    """A replay's telemetry series: ``[(t_s, [[src, dst, utilization, load_gbps, drops], ...]), ...]``;
    a torn last line (a killed run) is left out."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            out.append((float(row["t_s"]), list(row["links"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _tier_of(topo: topologies.Topology, link: tuple[str, str]) -> int:
    try:
        return int(topo.link_between(*link).tier)
    except (KeyError, ValueError, topologies.TopologyError):
        return -1


def write_report(run: Path) -> dict[str, Any]:
    comparison = compare(run)
    (run / "comparison.json").write_text(json.dumps(comparison, indent=2) + "\n")
    plot(comparison, run)
    return comparison


def _fmt_pct(value: Any) -> str:
    return "-" if value is None else f"{float(value):.0f}%"


def render_table(comparison: dict[str, Any]) -> str:
    cols = [("ok", "ok/req"), ("ttft_mean_ms", "TTFT mean"), ("ttft_p50_ms", "p50"), ("ttft_p99_ms", "p99"),
            ("ttft_slo_attainment", "SLO att."), ("transfer_mean_ms", "xfer mean"),
            ("transfer_ratio_p50", "xfer/ideal p50"), ("idle_transfer_ratio_p90", "idle/ideal p90"),
            ("tbt_mean_ms", "TBT mean"),
            ("decision_us_p99", "decide p99 us"), ("decision_cpu_us_p99", "decide cpu p99")]
    width = max([20] + [len(n) + 1 for n in comparison["schedulers"]])
    lines = [f"{'scheduler':{width}s}" + "".join(f"{h:>15s}" for _, h in cols)]
    for name, m in comparison["schedulers"].items():
        row = f"{name:{width}s}"
        for key, _ in cols:
            if key == "ok":
                cell = f"{m['ok']}/{m['requests']}"
            else:
                v = m.get(key)
                cell = "-" if v is None else (f"{100 * v:.1f}%" if key == "ttft_slo_attainment" else f"{v:.2f}")
            row += f"{cell:>15s}"
        verdict = m.get("verdict") or {}
        if verdict.get("within_envelope") is not True:
            row += f"  {describe(verdict).upper() if verdict.get('within_envelope') is None else describe(verdict)}"
        if m.get("partial"):
            missing = m.get("requests_without_record")
            row += ("  PARTIAL: " + (f"{missing} of {m.get('requests_expected')} requests have no record"
                                     if missing else "the replay did not finish"))
        lines.append(row)
    for name, m in comparison["schedulers"].items():
        by_tier = m.get("idle_transfer_ratio_p90_by_tier") or {}
        counts = m.get("idle_transfers_by_tier") or {}
        env = m.get("envelope") or {}
        lines.append(f"emulator, {name}: idle-path transfers/ideal at p90 by tier distance "
                     + (", ".join(f"{t}: {v:.2f} (n={counts.get(t, 0)})" for t, v in by_tier.items()
                                  if v is not None) or "none")
                     + f"; busiest switch process p95 {_fmt_pct(env.get('switch_cpu_pct_p95'))} of a core, "
                       f"machine p95 {_fmt_pct(env.get('machine_busy_pct_p95'))}")
    for name, m in comparison["schedulers"].items():
        net = []
        if m.get("tcp_retransmit_rate") is not None:
            net.append(f"TCP retransmitted {m.get('tcp_segments_retransmitted')} segments "
                       f"({100 * m['tcp_retransmit_rate']:.3f}% of those sent)")
        if m.get("queue_drops") is not None:
            net.append(f"queues dropped {m['queue_drops']} packets (by tier {m.get('queue_drops_by_tier') or {}})")
        oracle = m.get("oracle_vs_fabric") or {}
        if oracle:
            net.append(f"transfer measured / oracle's estimate: median {oracle['all']['ratio_p50']} "
                       f"[p10 {oracle['all']['ratio_p10']}, p90 {oracle['all']['ratio_p90']}] "
                       f"over {oracle['all']['n']} transfers")
        if net:
            lines.append(f"network, {name}: " + "; ".join(net))
    for name, m in comparison["schedulers"].items():
        if m.get("fault_events"):
            parts = []
            for e in m["fault_events"]:
                figures = ", ".join(f"{k} {e[k]:g}" for k in FAULT_FIGURES if k in e)
                outcome = "" if str(e.get("outcome", "")).startswith("ok") else f" [{e.get('outcome')}]"
                parts.append(f"{e['kind']} at {e.get('actual_t_s')} s" + (f" ({figures})" if figures else "")
                             + outcome)
            lines.append(f"faults, {name}: " + "; ".join(parts))
            lines.append(f"faults, {name}: TTFT mean {m.get('ttft_mean_ms_before_faults')} ms before the first, "
                         f"{m.get('ttft_mean_ms_from_first_fault')} ms from it on; "
                         f"{m.get('failed_from_first_fault')} requests failed from it on")
    for name, verdict in (comparison.get("verdict_changed_on_rejudging") or {}).items():
        lines.append(f"re-judged, {name}: {describe(verdict)} under today's rule; stored at run time: "
                     f"{verdict.get('stored_within_envelope')}")
    changes = comparison.get("ttft_mean_change_pct", {})
    for a, row in changes.items():
        lines.append(f"mean TTFT of {a} vs " + ", ".join(f"{b}: {v:+.1f}%" for b, v in row.items() if v is not None))
    lines.append(f"files: {comparison['run_dir']}/comparison.json, comparison.png")
    return "\n".join(lines)
