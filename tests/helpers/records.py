"""A well-formed ok record."""

from __future__ import annotations

from typing import Any

from netkv.records import empty_record


def ok_record(rid: str, ttft_ms: float = 100.0) -> dict[str, Any]:
    rec = empty_record(rid, "stub", 1000.0, 1000, 3)
    t = 1000.0
    rec.update(
        status="ok", prefill="g0", decode="g1",
        tier_distance=0, decision_us=12.0, prefill_cached_tokens=0, tokens_sent=1000,
        queue_wait_ms=1.0, prefill_start_ms=t + 1, prefill_end_ms=t + 20, bytes_sent=131, kv_bytes=131072000,
        transfer_start_ms=t + 20, transfer_end_ms=t + 30, decode_admit_ms=t + 30,
        first_token_ms=t + ttft_ms, completion_ms=t + ttft_ms + 20, ttft_ms=ttft_ms,
        tbt_mean_ms=10.0, tbt_p99_ms=10.0,
    )
    return rec
