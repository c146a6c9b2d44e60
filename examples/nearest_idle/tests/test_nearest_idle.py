"""The example scheduler on its own: views and an oracle, no testbed run."""

from __future__ import annotations

import topologies
from nearest_idle import NearestIdle
from netkv.oracle import StaticOracle
from netkv.request import DecodeView, Request


def view(name: str, active: int, queued: int = 0) -> DecodeView:
    return DecodeView(name, queued, active, 4, 100_000, frozenset(), 8)


def test_it_prefers_the_nearest_decode_with_a_free_slot() -> None:
    oracle = StaticOracle(topologies.build("tiny"))
    sched = NearestIdle({}, kv_bytes_per_token=131_072)
    req = Request("r1", 0.0, 2048, 8, (1, 2, 3, 4))
    # g1 shares g0's rack; g3 is across the aggregation layer
    assert sched.choose(req, "g0", [view("g1", 1), view("g3", 0)], oracle, 0.0).decode == "g1"
    # a full g1 waits: the farther g3 with a free slot wins
    assert sched.choose(req, "g0", [view("g1", 4, queued=2), view("g3", 0)], oracle, 0.0).decode == "g3"
