"""An example decode scheduler for the NetKV testbed, kept outside its code.

Among the decodes that can admit the request, prefer one with a free batch
slot (no wait), and among those the one the oracle prices cheapest to reach;
when none has a free slot, the one whose queue is shortest.  It subclasses the
testbed's documented base (docs/schedulers.md, "Bring your own scheduler")."""

from __future__ import annotations

from typing import ClassVar, Mapping, Sequence

from netkv.oracle import Oracle
from netkv.request import DecodeView, Request, matched_prefix_blocks
from netkv.schedulers import Decision, NoEligibleDecode, Param, Scheduler

__version__ = "0.1.0"


class NearestIdle(Scheduler):
    name = "nearest_idle"
    doc = "nearest decode (oracle's transfer estimate) with a free batch slot, else the shortest queue"
    params: ClassVar[Mapping[str, Param]] = {
        "slot_wait_ms": Param(50.0, 0.0, 1e6, "what a decode without a free slot costs on top of its transfer"),
    }

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        best: tuple[float, str, DecodeView, int, object] | None = None
        for d in decodes:
            if not d.eligible(request):
                continue
            matched = matched_prefix_blocks(request.hash_ids, d.cached_blocks)
            tokens = max(0, request.input_tokens - matched * 512)
            est = oracle.estimate(prefill, d.name, tokens * self.kv_bytes_per_token, now_s)
            waits = d.active_batch >= d.max_batch
            cost = est.transfer_ms + (self.cfg["slot_wait_ms"] * (1 + d.queue_len) if waits else 0.0)
            if best is None or (cost, d.name) < (best[0], best[1]):
                best = (cost, d.name, d, tokens, est)
        if best is None:
            raise NoEligibleDecode(f"request {request.request_id}: no decode can admit it")
        cost, name, d, tokens, est = best
        return Decision(name, {"cost_ms": cost, "queue_len": float(d.queue_len)}, tokens,
                        tokens * self.kv_bytes_per_token, est)  # type: ignore[arg-type]
