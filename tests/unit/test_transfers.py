"""lab.transfers: ideal time, htb bucket and the idle-path rule on hand-built records."""

from __future__ import annotations

from typing import Any

import pytest

import topologies
from lab.transfers import bucket_ms, ideal_ms, idle_transfers

TOPO = topologies.build("fattree")
SCALE = 40_000.0


def rec(rid: str, src: str, dst: str, start: float, end: float, nbytes: int, status: str = "ok") -> dict[str, Any]:
    return {"request_id": rid, "status": status, "prefill": src, "decode": dst, "bytes_sent": nbytes,
            "transfer_start_ms": start, "transfer_end_ms": end, "tier_distance": TOPO.tier_distance(src, dst)}


def test_ideal_and_bucket() -> None:
    r = rec("a", "g0", "g32", 0, 10, 50_000)  # across the core: 200 Gbit/s / 40,000 = 5 Mbit/s
    assert ideal_ms(TOPO, SCALE, r) == pytest.approx(50_000 * 8 / 5e6 * 1e3)
    # the bucket (four frames > 1 ms of the rate) and the one frame htb lets overdraw it
    assert bucket_ms(TOPO, SCALE, 1500, r) == pytest.approx(5 * 1514 * 8 / 5e6 * 1e3)


def test_idle_rule() -> None:
    recs = [rec("a", "g0", "g32", 0, 100, 50_000),
            rec("b", "g2", "g32", 50, 150, 50_000),      # shares g32's downlink with a while both run
            rec("c", "g4", "g6", 0, 100, 50_000),        # other server: idle
            rec("d", "g0", "g1", 100, 200, 50_000),      # starts when a ended: idle
            rec("e", "g8", "g9", 0, 10, 100),            # ideal below 5 ms: not judged
            rec("f", "g4", "g40", 300, 400, 50_000, status="failed"),  # failed: not judged ...
            rec("g", "g4", "g41", 350, 450, 50_000)]     # ... but it makes g's uplink busy
    idle = {t.request_id: t for t in idle_transfers(TOPO, SCALE, 1500, recs)}
    assert set(idle) == {"c", "d"}
    assert idle["c"].ratio == pytest.approx(100 / idle["c"].ideal_ms)
    assert idle["c"].within(100 / idle["c"].ideal_ms + 1e-9) and not idle["c"].within(1.0)


def test_background_flows_make_a_path_busy_while_they_run() -> None:
    from lab.transfers import BACKGROUND_SLACK_MS, background_of

    # a background flow g2 -> g34 crosses the core from 10 s to 20 s of the replay
    bg = background_of(TOPO, [{"src": "g2", "dst": "g34", "start_s": 10, "duration_s": 10}])
    late = 20_000 + BACKGROUND_SLACK_MS + 1
    recs = [rec("during", "g2", "g34", 12_000, 12_100, 50_000),
            rec("before", "g2", "g34", 1_000, 1_100, 50_000),
            rec("after", "g2", "g34", late, late + 100, 50_000),
            rec("elsewhere", "g8", "g9", 12_000, 12_100, 50_000),   # same server: no hop of the flow
            rec("slack", "g2", "g34", 20_500, 20_600, 50_000)]     # within the start/stop slack
    idle = {t.request_id for t in idle_transfers(TOPO, SCALE, 1500, recs, background=bg)}
    assert idle == {"before", "after", "elsewhere"}
    # without the scenario's flows every one of them is idle
    assert {t.request_id for t in idle_transfers(TOPO, SCALE, 1500, recs)} == {r["request_id"] for r in recs}


def test_a_transfer_on_another_ones_ack_path_is_not_idle() -> None:
    from lab.transfers import tcp_hops

    # g1 -> g9 sends data v0 -> t0 -> v1; g10 -> g2 sends the other way, over the first one's ACK path
    x, y = ("g1", "g9"), ("g10", "g2")
    assert not set(TOPO.path_hops(*x)) & set(TOPO.path_hops(*y))
    assert tcp_hops(TOPO, *x) & tcp_hops(TOPO, *y)
    recs = [rec("x", *x, 0, 100, 50_000), rec("y", *y, 50, 150, 50_000),
            rec("z", *x, 200, 300, 50_000)]  # alone afterwards: idle
    assert {t.request_id for t in idle_transfers(TOPO, SCALE, 1500, recs)} == {"z"}


def test_a_priced_transfer_is_loaded_only_where_the_background_data_shares_its_way() -> None:
    from lab.transfers import background_of, priced_transfers

    topo = topologies.build("fattree")
    bg = background_of(topo, [{"src": "g0", "dst": "g32", "start_s": 0, "duration_s": 100}])

    def rec(rid: str, src: str, dst: str) -> dict[str, object]:
        return {"request_id": rid, "status": "ok", "prefill": src, "decode": dst, "tier_distance": 3,
                "estimate_transfer_ms": 10.0, "transfer_start_ms": 1000.0, "transfer_end_ms": 1020.0,
                "bytes_sent": 1000}

    # g1 -> g33 leaves by g0's server uplink as the background does: loaded; g33 -> g1 only meets
    # the background's ACKs (the reverse direction): not loaded
    out = dict(zip(("same way", "reverse"),
                   priced_transfers(topo, [rec("a", "g1", "g33"), rec("b", "g33", "g1")], background=bg)))
    assert out["same way"].loaded is True and out["reverse"].loaded is False
    assert out["same way"].ratio == 2.0
