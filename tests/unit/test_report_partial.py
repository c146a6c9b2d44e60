"""A replay that did not finish (its process killed) is reported as partial,
with the number of the window's requests that have no record, from its files."""

from __future__ import annotations

from pathlib import Path

import topologies
from lab.report import scheduler_metrics, window_size
from netkv.records import RecordWriter, empty_record
from netkv.serving.config import ReplayConfig

TOPO = topologies.build("fattree")


def _replay_dir(tmp_path: Path, n_requests: int, n_records: int, *, finished: bool) -> Path:
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(f'{{"timestamp": {i * 100}, "input_length": 600, "output_length": 4, '
                             f'"hash_ids": [{i}, {i + 1000}]}}\n' for i in range(n_requests)))
    run_dir = tmp_path / "round_robin"
    run_dir.mkdir()
    cfg = ReplayConfig(trace_path=str(trace), duration_s=60.0)
    cfg.write(run_dir / "config.json")
    with RecordWriter(run_dir / "records.jsonl") as writer:
        for req in cfg.window().requests[:n_records]:
            rec = empty_record(req.request_id, "round_robin", req.arrival_ms, req.input_tokens, req.output_tokens)
            rec["reason"] = "run interrupted"
            writer.write(rec)
    if finished:
        (run_dir / "summary.json").write_text('{"problems": []}')
    return run_dir


def test_a_killed_replay_is_partial_with_the_missing_count(tmp_path: Path) -> None:
    run_dir = _replay_dir(tmp_path, 12, 5, finished=False)
    assert window_size(run_dir) == 12
    m = scheduler_metrics(run_dir, TOPO, 40_000.0, 1500, 2000.0)
    assert m["partial"] is True and m["requests"] == 5
    assert m["requests_expected"] == 12 and m["requests_without_record"] == 7
    assert "partial: 7 of the window's 12 requests have no record" in m["problems"]


def test_a_finished_replay_with_every_record_is_not_partial(tmp_path: Path) -> None:
    run_dir = _replay_dir(tmp_path, 8, 8, finished=True)
    m = scheduler_metrics(run_dir, TOPO, 40_000.0, 1500, 2000.0)
    assert m["partial"] is False and m["requests_without_record"] == 0 and m["problems"] == []


def test_unreadable_config_leaves_the_count_unknown(tmp_path: Path) -> None:
    run_dir = _replay_dir(tmp_path, 4, 4, finished=False)
    (run_dir / "config.json").write_text("{not json")
    m = scheduler_metrics(run_dir, TOPO, 40_000.0, 1500, 2000.0)
    assert m["requests_expected"] is None and m["partial"] is True


def test_a_finished_replay_whose_config_cannot_be_read_is_partial(tmp_path: Path) -> None:
    run_dir = _replay_dir(tmp_path, 4, 4, finished=True)
    (run_dir / "config.json").write_text("{not json")
    m = scheduler_metrics(run_dir, TOPO, 40_000.0, 1500, 2000.0)
    assert m["partial"] is True
    assert "partial: config.json cannot be read, so the window's size is unknown" in m["problems"]
