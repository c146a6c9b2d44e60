"""The report's decision-time figures: the wall p99 of the decisions that ran
through without a context switch or a collection, beside how many had one."""

from __future__ import annotations

from pathlib import Path

import pytest

import topologies
from lab.report import scheduler_metrics
from netkv.records import RecordWriter, empty_record
from netkv.serving.config import ReplayConfig

TOPO = topologies.build("fattree")


def _run(tmp_path: Path, decisions: list[tuple[float, float, int, int, float] | None]) -> Path:
    """One record per entry: (wall us, cpu us, preemptions, waits, gc us), or
    None for a record written before these fields existed."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(f'{{"timestamp": {i * 100}, "input_length": 600, "output_length": 4, '
                             f'"hash_ids": [{i}, {i + 1000}]}}\n' for i in range(len(decisions))))
    run_dir = tmp_path / "netkv"
    run_dir.mkdir()
    cfg = ReplayConfig(trace_path=str(trace), duration_s=60.0)
    cfg.write(run_dir / "config.json")
    with RecordWriter(run_dir / "records.jsonl") as writer:
        for req, d in zip(cfg.window().requests, decisions):
            rec = empty_record(req.request_id, "netkv", req.arrival_ms, req.input_tokens, req.output_tokens)
            rec["reason"] = "no eligible decode: test"
            if d is not None:
                wall, cpu, pre, waits, gc_us = d
                rec.update(decision_us=wall, decision_cpu_us=cpu, decision_preemptions=pre,
                           decision_waits=waits, decision_gc_us=gc_us)
            writer.write(rec)
    (run_dir / "summary.json").write_text('{"problems": []}')
    return run_dir


def test_unswitched_p99_leaves_out_preempted_waiting_and_collecting_decisions(tmp_path: Path) -> None:
    clean = [(100.0 + i, 95.0 + i, 0, 0, 0.0) for i in range(10)]
    run_dir = _run(tmp_path, clean + [(5000.0, 150.0, 1, 0, 0.0), (4000.0, 120.0, 0, 2, 0.0),
                                      (3000.0, 2900.0, 0, 0, 2800.0)])
    m = scheduler_metrics(run_dir, TOPO, 40_000.0, 1500, 2000.0)
    assert m["decision_us_p99_unswitched"] == pytest.approx(108.91, abs=0.01)  # numpy's p99 of 100..109
    assert m["decision_us_p99"] > 3000.0
    assert (m["decisions_preempted"], m["decisions_waited"], m["decisions_with_gc"]) == (1, 1, 1)


def test_records_without_the_fields_give_no_figure(tmp_path: Path) -> None:
    m = scheduler_metrics(_run(tmp_path, [None, None]), TOPO, 40_000.0, 1500, 2000.0)
    assert m["decision_us_p99_unswitched"] is None
    assert m["decisions_preempted"] is None and m["decisions_with_gc"] is None
