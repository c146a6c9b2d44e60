"""Baseline decode selectors, re-implemented from their public descriptions.

Each is documented with its formula and weights in docs/schedulers.md.  Unless
stated otherwise the lowest score wins and equal scores go to the smaller
decode name (plain string order).
"""

from __future__ import annotations

import itertools
import json
import math
import random as _random
from pathlib import Path
from typing import ClassVar, Iterable, Mapping, Sequence

from ..oracle import Oracle
from ..request import BLOCK_TOKENS, DecodeView, Request, matched_prefix_blocks
from .base import (
    LOAD_PARAMS,
    CostFn,
    Decision,
    NoEligibleDecode,
    Param,
    Scheduler,
    argmin_by_name,
    eligible_views,
    load_ms,
    no_eligible,
    register,
    send_tokens,
)


def _decision(s: Scheduler, request: Request, d: DecodeView, terms: dict[str, float],
              matched: int | None = None) -> Decision:
    if matched is None:
        matched = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
    tokens = send_tokens(request, matched)
    terms = {**terms, "matched_blocks": float(matched)}
    return Decision(d.name, terms, tokens, tokens * s.kv_bytes_per_token, None)


def _eligible_or_raise(request: Request, decodes: Sequence[DecodeView]) -> list[DecodeView]:
    out = eligible_views(request, decodes)
    if not out:
        raise no_eligible(request, decodes)
    return out


@register
class RoundRobin(Scheduler):
    """Cycles through decodes in name order, skipping ineligible ones (as the
    vLLM and Mooncake disaggregated-serving example proxies cycle instances)."""

    name = "round_robin"
    doc = "next decode in name order after the previous pick, skipping ineligible ones"

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        self._last: str | None = None

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = sorted(_eligible_or_raise(request, decodes), key=lambda d: d.name)
        pick = ok[0]
        if self._last is not None:
            for d in ok:
                if d.name > self._last:
                    pick = d
                    break
        self._last = pick.name
        return _decision(self, request, pick, {"position": float(ok.index(pick)), "eligible": float(len(ok))})


@register
class RandomChoice(Scheduler):
    name = "random"
    doc = "uniformly random eligible decode (seeded)"

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        self._rng = _random.Random(seed)

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = sorted(_eligible_or_raise(request, decodes), key=lambda d: d.name)
        pick = ok[self._rng.randrange(len(ok))]
        return _decision(self, request, pick, {"eligible": float(len(ok))})


@register
class LeastLoaded(Scheduler):
    name = "least_loaded"
    doc = "fewest requests (decoding + waiting) per batch slot"

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        score, _, d = argmin_by_name(((d.active_batch + d.queue_len) / d.max_batch, d.name, d) for d in ok)
        return _decision(self, request, d, {"load_per_slot": score, "eligible": float(len(ok))})


@register
class CacheAware(Scheduler):
    name = "cache_aware"
    doc = "most leading prefix blocks already cached (fewest bytes to send); ties to least loaded"

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        best: tuple[int, float, str, DecodeView] | None = None
        for d in ok:
            m = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
            key = (-m, (d.active_batch + d.queue_len) / d.max_batch, d.name, d)
            if best is None or key[:3] < best[:3]:
                best = key
        assert best is not None
        m, load, _, d = best
        return _decision(self, request, d, {"load_per_slot": load, "eligible": float(len(ok))}, -m)


@register
class KVRouter(Scheduler):
    """NVIDIA Dynamo KV router's described cost: ``overlap_weight * prefill
    blocks + active blocks``, lowest wins; temperature > 0 samples a softmax."""

    name = "kv_router"
    doc = "Dynamo KV router cost: overlap_weight*blocks still to send + blocks active on the decode"
    params: ClassVar[Mapping[str, Param]] = {
        "overlap_weight": Param(1.0, 0.0, 1e6, "weight of the blocks not cached on the decode"),
        "temperature": Param(0.0, 0.0, 1e3, "0: argmin; > 0: softmax sampling over normalized costs"),
    }

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        self._rng = _random.Random(seed)

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        request_blocks = math.ceil(request.input_tokens / BLOCK_TOKENS)
        w = self.cfg["overlap_weight"]
        rows = []
        for d in ok:
            m = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
            prefill_blocks = max(0, request_blocks - m)
            active_blocks = math.ceil(d.used_kv_tokens / BLOCK_TOKENS) + request_blocks
            rows.append((w * prefill_blocks + active_blocks, d.name, (d, m, prefill_blocks, active_blocks)))
        temp = self.cfg["temperature"]
        if temp == 0.0:
            cost, _, (d, m, pb, ab) = argmin_by_name(rows)
        else:
            rows.sort(key=lambda r: r[1])
            lo, hi = min(r[0] for r in rows), max(r[0] for r in rows)
            span = hi - lo
            weights = [math.exp(-((r[0] - lo) / span if span > 0 else 0.0) / temp) for r in rows]
            cost, _, (d, m, pb, ab) = self._rng.choices(rows, weights=weights)[0]
        return _decision(self, request, d, {"cost": cost, "prefill_blocks": float(pb), "active_blocks": float(ab),
                                            "overlap_weight": w, "eligible": float(len(ok))}, m)


@register
class SGLangCacheBalance(Scheduler):
    """SGLang router's described cache-aware policy: balance first, then cache."""

    name = "sglang_cache_balance"
    doc = "SGLang router: shortest queue if load imbalanced, else best prefix match above threshold, else least loaded"
    params: ClassVar[Mapping[str, Param]] = {
        "cache_threshold": Param(0.5, 0.0, 1.0, "minimum matched fraction of the prompt to route by cache"),
        "balance_abs_threshold": Param(32.0, 0.0, 1e9, "imbalanced if max load - min load exceeds this ..."),
        "balance_rel_threshold": Param(1.0001, 1.0, 1e9, "... and max load exceeds min load times this"),
    }

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        cfg = self.cfg
        loads = [d.active_batch + d.queue_len for d in ok]
        hi, lo = max(loads), min(loads)
        terms = {"max_load": float(hi), "min_load": float(lo), "eligible": float(len(ok))}
        if hi - lo > cfg["balance_abs_threshold"] and hi > lo * cfg["balance_rel_threshold"]:
            load, _, d = argmin_by_name((float(l), d.name, d) for l, d in zip(loads, ok))
            return _decision(self, request, d, {**terms, "branch": 0.0, "load": load})
        best_rate, best = -1.0, ok[0]
        best_m = 0
        for d in ok:
            m = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
            rate = min(request.input_tokens, m * BLOCK_TOKENS) / request.input_tokens if request.input_tokens else 0.0
            if rate > best_rate or (rate == best_rate and d.name < best.name):
                best_rate, best, best_m = rate, d, m
        if best_rate > cfg["cache_threshold"]:
            return _decision(self, request, best, {**terms, "branch": 1.0, "match_rate": best_rate}, best_m)
        load, _, d = argmin_by_name((float(l), d.name, d) for l, d in zip(loads, ok))
        return _decision(self, request, d, {**terms, "branch": 2.0, "load": load, "match_rate": best_rate})


@register
class StaticTopology(Scheduler):
    """Fixed per-tier proximity cost plus the shared queue-wait model; no telemetry
    (llm-d's topology-aware scoring / a constant per-link-class transfer overhead)."""

    name = "static_topology"
    doc = "fixed per-tier transfer penalty + queue wait; topology only, no live telemetry"
    params: ClassVar[Mapping[str, Param]] = {
        "w_load": Param(1.0, 0.0, 1e6, "weight of the queue-wait estimate (ms)"),
        "w_tier": Param(1.0, 0.0, 1e6, "weight of the per-tier penalty (ms)"),
        "tier0_ms": Param(0.0, 0.0, 1e6, "penalty for a decode on the prefill's server"),
        "tier1_ms": Param(10.0, 0.0, 1e6, "penalty for a decode in the same rack"),
        "tier2_ms": Param(20.0, 0.0, 1e6, "penalty for a decode in the same pod"),
        "tier3_ms": Param(40.0, 0.0, 1e6, "penalty for a decode across the core"),
        **LOAD_PARAMS,
    }

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        cfg = self.cfg
        tier_of = getattr(oracle, "tier", None)
        rows = []
        for d in ok:
            tier = tier_of(prefill, d.name) if tier_of is not None else oracle.estimate(prefill, d.name, 0, now_s).tier
            penalty = cfg[f"tier{max(tier, 0)}_ms"]
            load = load_ms(d, cfg["slot_wait_ms"], cfg["step_ms_per_active"])
            rows.append((cfg["w_load"] * load + cfg["w_tier"] * penalty, d.name, (d, tier, load, penalty)))
        cost, _, (d, tier, load, penalty) = argmin_by_name(rows)
        return _decision(self, request, d, {"cost": cost, "tier": float(tier), "load_ms": load,
                                            "tier_penalty_ms": penalty, "eligible": float(len(ok))})


DOMAIN_NAMES = {0: "server", 1: "rack", 2: "pod"}


@register
class DynamoTopology(Scheduler):
    """NVIDIA Dynamo's decode pick in disaggregated serving, with its
    topology-aware KV transfer (experimental, 1.2 and later).

    Once the prefill worker is chosen, Dynamo routes the decode request with the
    overlap credit set to 0 (the decode receives the KV from the prefill), so
    its KV-router cost is load only: ``decode_blocks +
    active_request_weight * active requests``, lowest wins (temperature 0).
    The prefill worker's topology domain then constrains it: ``required``
    leaves out every decode outside the domain (a request with none there
    fails); ``preferred`` multiplies the cost of each decode inside it by
    ``exp(-tanh(w))`` (w = ``preferred_weight``; 0.85 gives about 0.50).  The
    domain here is the server (tier distance 0), the rack (1) or the pod (2).
    Static topology only: no telemetry.  Sources: docs/schedulers.md."""

    name = "dynamo_topology"
    doc = "Dynamo decode pick (KV-router cost, overlap credit 0) with topology-aware KV transfer: domain required/preferred"
    params: ClassVar[Mapping[str, Param]] = {
        "domain_tier": Param(0.0, 0.0, 2.0, "the prefill's topology domain: decodes within this tier distance "
                                            "share it (0 server, 1 rack, 2 pod)"),
        "required": Param(0.0, 0.0, 1.0, "1: enforcement 'required' (only decodes in the domain); 0: 'preferred'"),
        "preferred_weight": Param(0.85, 0.0, 1.0, "kv_transfer_preferred_weight w: a decode in the domain costs "
                                                  "exp(-tanh(w)) times its cost"),
        "active_request_weight": Param(0.0, 0.0, 1e6, "decode_active_request_weight: cost per active request"),
    }

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        for key in ("domain_tier", "required"):
            if self.cfg[key] != int(self.cfg[key]):
                raise ValueError(f"dynamo_topology: {key} must be a whole number, got {self.cfg[key]}")
        self.domain_tier = int(self.cfg["domain_tier"])
        self.required = bool(self.cfg["required"])
        self.in_domain_factor = math.exp(-math.tanh(self.cfg["preferred_weight"]))

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        tier_of = getattr(oracle, "tier", None)
        request_blocks = math.ceil(request.input_tokens / BLOCK_TOKENS)
        rows = []
        for d in ok:
            tier = tier_of(prefill, d.name) if tier_of is not None else oracle.estimate(prefill, d.name, 0, now_s).tier
            inside = tier <= self.domain_tier
            if self.required and not inside:
                continue
            blocks = math.ceil(d.used_kv_tokens / BLOCK_TOKENS) + request_blocks
            cost = blocks + self.cfg["active_request_weight"] * d.active_batch
            if inside:
                cost *= self.in_domain_factor
            rows.append((cost, d.name, (d, tier, blocks)))
        if not rows:
            raise NoEligibleDecode(f"none of {len(ok)} eligible decode(s) is in the prefill's "
                                   f"{DOMAIN_NAMES[self.domain_tier]} ({prefill}), and the domain is required")
        cost, _, (d, tier, blocks) = argmin_by_name(rows)
        return _decision(self, request, d, {"cost": cost, "tier": float(tier), "decode_blocks": float(blocks),
                                            "in_domain": float(tier <= self.domain_tier),
                                            "eligible": float(len(ok))})


# Default weights of tuned_cache_load come from the testbed's documented sweep
# (`python -m bench tune`: tune() over TUNING_GRID on a trace window disjoint
# from the evaluation window), recorded with its provenance and every measured
# combination in tuned_weights.json beside this file.  Without that file the
# defaults are equal weights: UNTUNED PLACEHOLDERS chosen without measurement,
# and TUNED_SOURCE says so.
TUNED_WEIGHTS_FILE = Path(__file__).with_name("tuned_weights.json")
PLACEHOLDER_WEIGHTS: Mapping[str, float] = {"w_cache": 1.0, "w_load": 1.0}


def load_tuned_weights(path: Path = TUNED_WEIGHTS_FILE) -> tuple[dict[str, float], str]:
    """``(weights, source)`` from a sweep's result file; the placeholders and a
    source saying they are untuned when the file does not exist.  A file that
    exists but is malformed raises ValueError naming it."""
    if not path.exists():
        return dict(PLACEHOLDER_WEIGHTS), (f"untuned placeholder weights (no sweep result at {path.name}; "
                                           "run `python -m bench tune`)")
    try:
        data = json.loads(path.read_text())
        weights = data["weights"]
        out = {k: float(weights[k]) for k in PLACEHOLDER_WEIGHTS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a tuning result with weights {sorted(PLACEHOLDER_WEIGHTS)}: {exc!r}") from None
    extra = sorted(set(weights) - set(out))
    if extra or not all(math.isfinite(v) and v >= 0 for v in out.values()):
        raise ValueError(f"{path}: weights must be exactly {sorted(out)} with finite values >= 0, got {weights!r}")
    window = data.get("tuning_window_s")
    return out, f"sweep of {data.get('date', '?')} on trace window {window} s ({path.name})"


def tuning_window_s(trace_path: Path | None = None, path: Path = TUNED_WEIGHTS_FILE) -> tuple[float, float] | None:
    """``(start_s, end_s)`` of the trace window the weights were tuned on, as the
    sweep recorded it (``tuning_window_s``), or None without a result file, or
    when ``trace_path`` is given and is not the trace they were tuned on (its
    SHA-256 differs).  Evaluation windows must not overlap it
    (``netkv.stats.evaluation_windows``, ``netkv run``'s window check)."""
    import hashlib

    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        a, b = (float(v) for v in data["tuning_window_s"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: no tuning_window_s [start_s, end_s]: {exc!r}") from None
    if not (math.isfinite(a) and math.isfinite(b) and 0 <= a < b):
        raise ValueError(f"{path}: tuning_window_s must be [start_s, end_s] with 0 <= start < end, got {[a, b]}")
    if trace_path is not None:
        try:
            if hashlib.sha256(trace_path.read_bytes()).hexdigest() != str(data.get("trace_sha256")):
                return None
        except OSError:
            return None
    return a, b


TUNED_DEFAULTS, TUNED_SOURCE = load_tuned_weights()
TUNING_GRID: Mapping[str, tuple[float, ...]] = {
    "w_cache": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
    "w_load": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0),
}


@register
class TunedCacheLoad(Scheduler):
    """score = w_cache * matched fraction of the prompt - w_load * load per
    batch slot; highest wins.  Weights come from :func:`tune`."""

    name = "tuned_cache_load"
    doc = "w_cache*prefix match fraction - w_load*load per slot, weights from a sweep on a separate trace window"
    params: ClassVar[Mapping[str, Param]] = {
        "w_cache": Param(TUNED_DEFAULTS["w_cache"], 0.0, 1e6, "weight of the matched prompt fraction (0..1)"),
        "w_load": Param(TUNED_DEFAULTS["w_load"], 0.0, 1e6, "weight of the load (0..1)"),
        "kv_memory": Param(0.0, 0.0, 1.0, "1: the load is what limits a decode, the larger of its batch slots in "
                                          "use ((active + waiting) / max_batch) and its KV memory in use; 0: batch "
                                          "slots only (the signal its default weights were tuned with, 2026-11-23)"),
    }

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        if self.cfg["kv_memory"] not in (0.0, 1.0):
            raise ValueError(f"scheduler tuned_cache_load: kv_memory must be 0 or 1, got {self.cfg['kv_memory']}")

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        ok = _eligible_or_raise(request, decodes)
        wc, wl = self.cfg["w_cache"], self.cfg["w_load"]
        kv = self.cfg["kv_memory"] == 1.0
        rows = []
        for d in ok:
            m = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
            frac = min(request.input_tokens, m * BLOCK_TOKENS) / request.input_tokens if request.input_tokens else 0.0
            load = (d.active_batch + d.queue_len) / d.max_batch
            if kv:
                load = max(load, kv_memory_in_use(d))
            rows.append((-(wc * frac - wl * load), d.name, (d, m, frac, load)))
        neg, _, (d, m, frac, load) = argmin_by_name(rows)
        return _decision(self, request, d, {"score": -neg, "match_fraction": frac, "load_per_slot": load,
                                            "w_cache": wc, "w_load": wl, "eligible": float(len(ok))}, m)


def kv_memory_in_use(d: DecodeView) -> float:
    """The fraction of a decode's KV memory its unfinished requests hold (0..1)."""
    held = d.used_kv_tokens + d.free_kv_tokens
    return d.used_kv_tokens / held if held > 0 else 1.0


def tune(cost: CostFn, grid: Mapping[str, Iterable[float]] = TUNING_GRID, *,
         tuning_window_ms: tuple[float, float], evaluation_window_ms: tuple[float, float],
         ) -> tuple[dict[str, float], list[tuple[dict[str, float], float]]]:
    """Grid search for ``tuned_cache_load`` weights.

    ``cost(weights)`` runs the scheduler with ``weights`` over the trace
    window ``tuning_window_ms`` (the caller does that) and returns the metric to
    minimize (e.g. mean TTFT in ms).  The two windows are ``(start_ms, end_ms)``
    of the trace; they must not overlap, so the weights are never fitted on the
    requests they are evaluated on.  Returns the best weights (first in grid
    order among equal costs) and every ``(weights, cost)`` tried."""
    (a0, a1), (b0, b1) = tuning_window_ms, evaluation_window_ms
    for label, (x0, x1) in (("tuning", (a0, a1)), ("evaluation", (b0, b1))):
        if not x0 < x1:
            raise ValueError(f"{label} window must be (start_ms, end_ms) with start < end, got {(x0, x1)}")
    if a0 < b1 and b0 < a1:
        raise ValueError(f"tuning window {tuning_window_ms} overlaps evaluation window {evaluation_window_ms}; "
                         "tune on a different part of the trace")
    keys = sorted(grid)
    unknown = [k for k in keys if k not in TunedCacheLoad.params]
    if unknown:
        raise ValueError(f"unknown weight {unknown[0]!r}; allowed: {', '.join(sorted(TunedCacheLoad.params))}")
    values = [tuple(grid[k]) for k in keys]
    if any(not v for v in values):
        raise ValueError(f"every grid axis needs at least one value, got {dict(zip(keys, values))}")
    results: list[tuple[dict[str, float], float]] = []
    best: tuple[dict[str, float], float] | None = None
    for combo in itertools.product(*values):
        weights = dict(zip(keys, (float(v) for v in combo)))
        value = float(cost(weights))
        if math.isnan(value):
            raise ValueError(f"cost callback returned NaN for {weights}")
        results.append((weights, value))
        if best is None or value < best[1]:
            best = (weights, value)
    assert best is not None
    return best[0], results
