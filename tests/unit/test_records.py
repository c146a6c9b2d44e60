"""Record schema, writer (one line per request, flushed), validator, summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netkv.records import (
    FIELD_NAMES,
    RecordError,
    RecordWriter,
    check_record,
    empty_record,
    read_records,
    summarize,
    validate_file,
)
from tests.helpers.records import ok_record


def test_empty_record_has_every_field_and_failed_needs_reason() -> None:
    rec = empty_record("L1", "stub", 0.0, 10, 1)
    assert tuple(rec) == FIELD_NAMES
    assert check_record(rec) == ["L1: failed record without a reason"]
    rec["reason"] = "prefill worker g0 exited"
    assert check_record(rec) == []


def test_ok_record_order_is_checked() -> None:
    assert check_record(ok_record("L1")) == []
    rec = ok_record("L2")
    rec["transfer_end_ms"] = rec["first_token_ms"] + 5  # arrives after its first token
    problems = check_record(rec)
    assert any("transfer_end_ms" in p and "is after decode_admit_ms" in p for p in problems)
    rec = ok_record("L3")
    rec["transfer_start_ms"] = None
    assert check_record(rec) == ["L3: ok record lacks transfer_start_ms"]
    rec = ok_record("L4")
    rec["bytes_sent"] = 1.5
    assert check_record(rec) == ["L4: bytes_sent must be int|null, got 1.5"]
    rec = ok_record("L5")
    rec["surprise"] = 1
    assert check_record(rec) == ["L5: unknown fields surprise"]


def test_writer_appends_flushes_and_refuses_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    writer = RecordWriter(path)
    writer.write(ok_record("L1"))
    # flushed: readable before close
    assert [r["request_id"] for r in read_records(path)] == ["L1"]
    with pytest.raises(RecordError, match="L1: a record was already written"):
        writer.write(ok_record("L1"))
    bad = ok_record("L2")
    bad["status"] = "maybe"
    with pytest.raises(RecordError, match="status must be one of"):
        writer.write(bad)
    writer.close()
    assert len(path.read_text().splitlines()) == 1


def test_validate_file_finds_duplicates_missing_and_extra(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    lines = [ok_record("L1"), ok_record("L1"), ok_record("L9")]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    problems = validate_file(path, expected_ids=["L1", "L2"])
    assert "L1: 2 records" in problems
    assert "L2: no record" in problems
    assert "L9: record for a request that was not replayed" in problems


def test_summary_is_computed_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as writer:
        for i, ttft in enumerate([100.0, 200.0, 300.0, 400.0]):
            writer.write(ok_record(f"L{i}", ttft))
        failed = empty_record("L9", "stub", 5.0, 10, 1)
        failed["reason"] = "not finished by the drain deadline"
        writer.write(failed)
    s = summarize(path, ttft_slo_ms=250.0)
    assert (s["requests"], s["ok"], s["failed"]) == (5, 4, 1)
    assert s["ttft_mean_ms"] == 250.0
    assert s["ttft_p50_ms"] == 250.0
    assert s["ttft_p99_ms"] == pytest.approx(397.0)
    assert s["ttft_slo_attainment"] == 2 / 5  # failures count as misses
    assert s["failure_reasons"] == {"not finished by the drain deadline": 1}
    with pytest.raises(ValueError, match="ttft_slo_ms must be"):
        summarize(path, ttft_slo_ms=0)


