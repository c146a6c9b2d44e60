"""A tensor-parallel model on the emulated fabric (root): Llama-3.1-70B at TP 4,
each instance four GPU hosts of one server, every KV transfer four concurrent
TCP flows from rank i of the prefill instance's hosts to rank i of the decode
instance's hosts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from fabric.config import TestbedConfig
from fabric.net import Testbed
from lab.emulator import MininetLauncher
from netkv import perfmodel
from netkv.records import read_records, validate_file
from netkv.serving.config import ReplayConfig
from netkv.traces import DEFAULT_TRACE
from tests.helpers.net import free_port, test_prefix
from workers.run import replay

pytestmark = pytest.mark.root
# Two 8-GPU servers, one per rack, in one pod: TP-4 instances P g0, D g4 (same
# server as g0), P g8, D g12 (other rack), so transfers run at tiers 0 and 2.
TP_FABRIC = {"gpus_per_server": 8, "servers_per_rack": 1, "racks_per_pod": 2, "pods": 1, "aggs_per_pod": 2,
             "cores": 0, "agg_oversub": 1}
REQUESTS = 16


def rank_flows(log_text: str, request_id: str) -> list[dict[str, Any]]:
    """The decode worker's line for one request: each rank's bytes, sender,
    listener and end time."""
    lines = [ln for ln in log_text.splitlines() if f" KV {request_id} complete: " in ln]
    assert len(lines) == 1, (request_id, lines)
    out = []
    for i, part in enumerate(lines[0].split(" complete: ", 1)[1].split("; ")):
        rank, idx, nbytes, unit, pair, end, end_s = part.split(" ")
        assert (rank, int(idx), unit, end) == ("rank", i, "B", "end"), part
        src, dst = pair.split("->")
        ip, port = dst.rsplit(":", 1)
        out.append({"bytes": int(nbytes), "src_ip": src, "dst_ip": ip, "dst_port": int(port), "end_s": float(end_s)})
    return out


def test_tp4_replay_moves_each_transfer_as_four_rank_flows(tmp_path: Path) -> None:
    bed = Testbed(TestbedConfig(topology="fattree", params=TP_FABRIC, prefix=test_prefix("t"),
                                of_port=free_port(), rest_port=free_port()))
    topo = bed.topo
    cfg = ReplayConfig(trace_path=str(DEFAULT_TRACE), duration_s=60.0, max_requests=REQUESTS, topology="fattree",
                       topology_params=TP_FABRIC, model="llama-3.1-70b", scheduler="round_robin", oracle="static",
                       scale_factor=bed.config.scale, drain_timeout_s=120.0)
    bed.up()
    try:
        summary = replay(cfg, MininetLauncher(bed), tmp_path / "run", topology=topo)
    finally:
        bed.down()
    assert bed.down().total == 0
    run = tmp_path / "run"
    records = read_records(run / "records.jsonl")
    # requests in = records out, every one ok
    assert summary["requests"] == len(records) == REQUESTS and summary["problems"] == []
    assert len({r["request_id"] for r in records}) == REQUESTS
    assert validate_file(run / "records.jsonl") == []
    assert all(r["status"] == "ok" for r in records), [r["reason"] for r in records if r["status"] != "ok"]
    info = json.loads((run / "run.json").read_text())
    ranks = info["placement"]["ranks"]
    assert info["placement"]["prefill"] == ["g0", "g8"] and info["placement"]["decode"] == ["g4", "g12"]
    assert sorted(info["workers"]) == ["g0", "g12", "g4", "g8"]  # one process per instance
    perf = perfmodel.build("llama-3.1-70b")
    logs = {d: (run / "logs" / f"{d}.log").read_text() for d in ("g4", "g12")}
    tiers = set()
    for r in records:
        tiers.add(r["tier_distance"])
        assert r["tier_distance"] == topo.tier_distance(r["prefill"], r["decode"])
        want = [math.ceil(b / cfg.scale_factor) for b in perf.rank_flow_bytes(r["kv_bytes"])]
        assert r["bytes_sent"] == sum(want)
        flows = rank_flows(logs[r["decode"]], r["request_id"])
        assert len(flows) == 4
        for i, f in enumerate(flows):
            # rank i's flow left rank i's prefill host and reached rank i's decode host
            assert f["src_ip"] == topo.ip_of(ranks[r["prefill"]][i]), (r["request_id"], i, f)
            assert (f["dst_ip"], f["dst_port"]) == bed.data_addr(ranks[r["decode"]][i]), (r["request_id"], i, f)
            assert f["bytes"] == want[i]
        # the transfer ended when its last rank flow landed
        last_ms = (max(f["end_s"] for f in flows) - summary["run_start_epoch_s"]) * 1000.0
        assert last_ms == pytest.approx(r["transfer_end_ms"], abs=1e-3)
        assert r["prefill_end_ms"] <= r["transfer_start_ms"] <= r["transfer_end_ms"] <= r["first_token_ms"]
    assert tiers == {0, 2}, "round robin should send to the same server and to the other rack"
