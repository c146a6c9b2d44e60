"""NetKV: O(|D|) greedy over load + oracle transfer cost, tier-ranked within a band.

For every eligible decode ``d`` (prefill instance ``p``)::

    bytes(d)    = tokens_to_send(request, d.cached_blocks) * kv_bytes_per_token
    load_ms(d)  = slot_wait_ms * max(0, queue_len + active_batch + 1 - max_batch)
                  + step_ms_per_active * active_batch
    cost(d)     = w_load * load_ms(d) + w_transfer * oracle.estimate(p, d, bytes(d)).transfer_ms

Tier rule: let ``c* = min cost`` and ``band = c* * (1 + tier_tolerance) +
tier_tolerance_ms``.  The chosen decode is the cheapest one of the *lowest tier
distance* (from ``p``) that has a candidate with ``cost <= band``.  So among
candidates whose costs are indistinguishable within the tolerance the
topologically nearest wins, and a farther decode wins only when it is cheaper
by more than the tolerance.  Equal costs inside a tier go to the smaller name.

One pass keeps the cheapest candidate per tier (at most five tiers), so the
decision is O(|D|) with one oracle lookup per eligible candidate.  With a
:class:`~netkv.schedulers.pool.DecodePool` and an oracle offering
``transfer_table`` the pass is vectorized with numpy.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from ..oracle import Estimate, Oracle
from ..request import BLOCK_TOKENS, DecodeView, Request
from .base import LOAD_PARAMS, Decision, Param, Scheduler, no_eligible, register
from .pool import DecodePool


@register
class NetKVScheduler(Scheduler):
    name = "netkv"
    doc = "NetKV greedy: w_load*queue wait + w_transfer*oracle transfer time, nearest tier within a cost band"
    uses_network = True
    params: ClassVar[Mapping[str, Param]] = {
        "w_load": Param(1.0, 0.0, 1e6, "weight of the queue-wait estimate (ms)"),
        "w_transfer": Param(1.0, 0.0, 1e6, "weight of the oracle's transfer time (ms)"),
        "tier_tolerance": Param(0.10, 0.0, 10.0, "relative width of the cost band the tier rule works in"),
        "tier_tolerance_ms": Param(0.05, 0.0, 1e6, "absolute width (ms) added to the band"),
        **LOAD_PARAMS,
    }

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        self._layouts: dict[tuple[int, str, int], dict[str, Any]] = {}

    def band_limit(self, best_cost: float) -> float:
        return best_cost * (1.0 + self.cfg["tier_tolerance"]) + self.cfg["tier_tolerance_ms"]

    def cost_of(self, request: Request, prefill: str, d: DecodeView, oracle: Oracle,
                now_s: float) -> tuple[float, float, Estimate]:
        """(cost, load_ms, estimate) of one candidate, straight from the formula
        (used by tests to check the fast paths)."""
        cfg = self.cfg
        matched = 0
        for h in request.hash_ids:
            if h not in d.cached_blocks:
                break
            matched += 1
        send = request.input_tokens - min(request.input_tokens, matched * BLOCK_TOKENS)
        ahead = d.queue_len + d.active_batch + 1 - d.max_batch
        load = (cfg["slot_wait_ms"] * ahead if ahead > 0 else 0.0) + cfg["step_ms_per_active"] * d.active_batch
        est = oracle.estimate(prefill, d.name, send * self.kv_bytes_per_token, now_s)
        return cfg["w_load"] * load + cfg["w_transfer"] * est.transfer_ms, load, est

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        table_fn = getattr(oracle, "transfer_table", None)
        if isinstance(decodes, DecodePool) and table_fn is not None:
            return self._choose_pool(request, prefill, decodes, oracle, now_s)
        return self._choose_views(request, prefill, decodes, oracle, now_s)

    # -- one Python pass over DecodeViews --------------------------------------------
    def _choose_views(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
                      now_s: float) -> Decision:
        cfg = self.cfg
        w_load, w_transfer = cfg["w_load"], cfg["w_transfer"]
        slot_wait, step = cfg["slot_wait_ms"], cfg["step_ms_per_active"]
        need = request.input_tokens + request.output_tokens
        inp = request.input_tokens
        hids = request.hash_ids
        kvb = self.kv_bytes_per_token
        table_fn = getattr(oracle, "transfer_table", None)
        table = table_fn(prefill, now_s) if table_fn is not None else None
        estimate = oracle.estimate
        # tier -> [cost, name, load_ms, transfer_ms, matched, send_tokens, estimate]
        best: dict[int, list[Any]] = {}
        eligible = 0
        oracle_calls = 0
        for d in decodes:
            if not ((d.active_batch < d.max_batch or d.queue_len < d.max_queue) and d.free_kv_tokens >= need):
                continue
            eligible += 1
            cached = d.cached_blocks
            matched = 0
            for h in hids:
                if h not in cached:
                    break
                matched += 1
            covered = matched * BLOCK_TOKENS
            send = inp - covered if covered < inp else 0
            ahead = d.queue_len + d.active_batch + 1 - d.max_batch
            load = (slot_wait * ahead if ahead > 0 else 0.0) + step * d.active_batch
            est: Estimate | None
            if table is not None:
                tier, base_ms, ms_per_byte = table[d.name]
                transfer = base_ms + send * kvb * ms_per_byte
                est = None
            else:
                est = estimate(prefill, d.name, send * kvb, now_s)
                oracle_calls += 1
                tier, transfer = est.tier, est.transfer_ms
            cost = w_load * load + w_transfer * transfer
            b = best.get(tier)
            if b is None or cost < b[0] or (cost == b[0] and d.name < b[1]):
                best[tier] = [cost, d.name, load, transfer, matched, send, est]
        if not best:
            raise no_eligible(request, decodes)
        best_cost = min(b[0] for b in best.values())
        limit = self.band_limit(best_cost)
        tier = min(t for t, b in best.items() if b[0] <= limit)
        cost, name, load, transfer, matched, send, est = best[tier]
        if est is None:
            est = estimate(prefill, name, send * kvb, now_s)
            oracle_calls += 1
        return Decision(
            decode=name,
            score_terms={
                "cost": cost, "load_ms": load, "transfer_ms": transfer, "tier": float(tier),
                "matched_blocks": float(matched), "best_cost": best_cost, "band_limit": limit,
                "w_load": w_load, "w_transfer": w_transfer,
                "eligible": float(eligible), "candidates_examined": float(len(decodes)),
                "oracle_calls": float(oracle_calls),
            },
            tokens_to_send=send, bytes_to_send=send * kvb, estimate=est,
        )

    # -- vectorized pass over a DecodePool ---------------------------------------------
    # Arrays are kept in "tier layout": pool indices sorted by (tier, name), so
    # each tier is one contiguous slice (its minimum is one reduceat) and the
    # first minimum inside a slice is the smallest name (the tie-break).
    # The cost is evaluated as  fixed + send_tokens * coef  with
    # fixed = w_load*load_ms + w_transfer*base_ms, coef = w_transfer*kv_bytes*ms_per_byte:
    # algebraically the formula above; it can differ from it in the last bits.
    def _layout(self, oracle: Any, prefill: str, pool: DecodePool, now_s: float) -> dict[str, Any]:
        table = oracle.transfer_table(prefill, now_s)
        key = (id(oracle), prefill, pool.names_version)
        lay = self._layouts.get(key)
        if lay is None or lay["epoch"] != table.epoch:
            rows = [table[n] for n in pool.names]
            order = sorted(range(len(rows)), key=lambda i: (rows[i][0], pool.names[i]))
            perm = np.array(order, dtype=np.int64)
            inv = np.empty_like(perm)
            inv[perm] = np.arange(len(perm))
            tiers = [rows[i][0] for i in order]
            starts = [k for k in range(len(tiers)) if k == 0 or tiers[k] != tiers[k - 1]]
            lay = {
                "epoch": table.epoch, "state": None, "perm": perm, "inv": inv.tolist(),
                "starts": np.array(starts, dtype=np.int64), "bounds": starts[1:] + [len(tiers)],
                "group_tiers": [tiers[k] for k in starts],
                "base": np.array([rows[i][1] for i in order]), "mpb": np.array([rows[i][2] for i in order]),
            }
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = lay
        if lay["state"] != pool.state_version:
            cfg = self.cfg
            perm = lay["perm"]
            ql, ab, mb = pool.queue_len[perm], pool.active_batch[perm], pool.max_batch[perm]
            ahead = ql + ab + (1 - mb)
            load = cfg["slot_wait_ms"] * np.maximum(ahead, 0) + cfg["step_ms_per_active"] * ab
            lay["load"] = load
            lay["fixed"] = cfg["w_load"] * load + cfg["w_transfer"] * lay["base"]
            lay["coef"] = (cfg["w_transfer"] * self.kv_bytes_per_token) * lay["mpb"]
            lay["room"] = (ab < mb) | (ql < pool.max_queue[perm])
            lay["free"] = pool.free_kv_tokens[perm]
            lay["state"] = pool.state_version
        return lay

    def _choose_pool(self, request: Request, prefill: str, pool: DecodePool, oracle: Oracle,
                     now_s: float) -> Decision:
        inp = request.input_tokens
        need = inp + request.output_tokens
        kvb = self.kv_bytes_per_token
        if len(pool) == 0:
            raise no_eligible(request, pool)
        lay = self._layout(oracle, prefill, pool, now_s)
        fixed, coef = lay["fixed"], lay["coef"]
        ok = lay["room"] & (lay["free"] >= need)
        cost = np.where(ok, fixed + inp * coef, math.inf)
        matched = pool.matched_blocks(request.hash_ids)
        inv = lay["inv"]
        for i, m in matched.items():
            j = inv[i]
            if ok[j]:
                covered = m * BLOCK_TOKENS
                cost[j] = fixed[j] + (inp - covered if covered < inp else 0) * coef[j]
        mins = np.minimum.reduceat(cost, lay["starts"]).tolist()
        best_cost = min(mins)
        if best_cost == math.inf:
            raise no_eligible(request, pool)
        limit = self.band_limit(best_cost)
        g = next(k for k, c in enumerate(mins) if c <= limit)
        lo = int(lay["starts"][g])
        j = lo + int(np.argmin(cost[lo:lay["bounds"][g]]))
        i = int(lay["perm"][j])
        name = pool.names[i]
        m = matched.get(i, 0)
        covered = m * BLOCK_TOKENS
        send_tokens = inp - covered if covered < inp else 0
        est = oracle.estimate(prefill, name, send_tokens * kvb, now_s)
        return Decision(
            decode=name,
            score_terms={
                "cost": float(cost[j]), "load_ms": float(lay["load"][j]), "transfer_ms": est.transfer_ms,
                "tier": float(lay["group_tiers"][g]), "matched_blocks": float(m),
                "best_cost": best_cost, "band_limit": limit,
                "w_load": self.cfg["w_load"], "w_transfer": self.cfg["w_transfer"],
                "eligible": float(np.count_nonzero(ok)), "candidates_examined": float(len(pool)),
                "oracle_calls": 1.0,
            },
            tokens_to_send=send_tokens, bytes_to_send=send_tokens * kvb, estimate=est,
        )
