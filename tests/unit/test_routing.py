"""Route computation: the compressed tables reproduce the chosen path of every pair."""

from __future__ import annotations

import pytest

import topologies
from controller.routing import PRIORITY_DST, PRIORITY_PAIR, FlowEntry, flow_entries, lookup, walk


@pytest.mark.parametrize("name", ["tiny", "leafspine", "fattree"])
def test_tables_reproduce_every_path(name: str) -> None:
    topo = topologies.build(name)
    tables = flow_entries(topo)
    gpus = topo.gpu_names()
    for src in gpus:
        for dst in gpus:
            if src != dst:
                assert walk(topo, tables, src, dst) == topo.path(src, dst)


def test_pair_entries_only_where_paths_split() -> None:
    topo = topologies.build("fattree")
    tables = flow_entries(topo)
    # A server switch has one uplink: it never chooses between equal-cost paths.
    for sw in topo.switches:
        pair_entries = [e for e in tables[sw.name] if e.priority == PRIORITY_PAIR]
        if sw.tier == 0:
            assert pair_entries == []
    assert any(e.priority == PRIORITY_PAIR for sw in topo.switches for e in tables[sw.name])


def test_lookup_prefers_pair_entry() -> None:
    entries = [FlowEntry("s", PRIORITY_DST, "10.0.0.2", None, 1),
               FlowEntry("s", PRIORITY_PAIR, "10.0.0.2", "10.0.0.1", 2)]
    assert lookup(entries, "10.0.0.1", "10.0.0.2") == 2
    assert lookup(entries, "10.0.0.3", "10.0.0.2") == 1
    assert lookup(entries, "10.0.0.3", "10.0.0.9") is None


def test_walk_detects_missing_entry() -> None:
    topo = topologies.build("tiny")
    tables = flow_entries(topo)
    tables["t0"] = []
    with pytest.raises(LookupError, match="t0 has no entry"):
        walk(topo, tables, "g0", "g2")
