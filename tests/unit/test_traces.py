"""Trace reader: the real trace, windowing, rate, malformed lines (refuse / skip)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netkv.traces import DEFAULT_TRACE, TraceError, iter_trace, load_trace

TRACE = DEFAULT_TRACE


def _line(ts: float = 0, inp: int = 600, out: int = 5, ids: list[int] | None = None) -> str:
    return json.dumps({"timestamp": ts, "input_length": inp, "output_length": out,
                       "hash_ids": [1, 2] if ids is None else ids})


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_real_trace_window_and_rate() -> None:
    full = load_trace(TRACE, start_s=0, duration_s=10)
    assert [r.request_id for r in full.requests[:3]] == ["L1", "L2", "L3"]
    assert all(0 <= r.arrival_ms < 10_000 for r in full.requests)
    first = full.requests[0]
    assert (first.input_tokens, first.output_tokens, len(first.hash_ids)) == (6758, 500, 14)
    fast = load_trace(TRACE, start_s=0, duration_s=10, rate_multiplier=2.0)
    assert len(fast.requests) == len(full.requests)
    assert [r.arrival_ms * 2 for r in fast.requests] == [r.arrival_ms for r in full.requests]
    later = load_trace(TRACE, start_s=3, duration_s=3)
    assert later.requests[0].request_id == "L11"  # lines 1-10 are at t=0, line 11 at 3000 ms
    assert later.requests[0].arrival_ms == 0.0
    assert all(r.arrival_ms < 3000 for r in later.requests)
    assert load_trace(TRACE, max_requests=25).requests[-1].request_id == "L25"


def test_whole_real_trace_is_well_formed() -> None:
    n = sum(1 for _ in iter_trace(TRACE))
    assert n == 12031


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"timestamp": 0, "input_length": 10, "output_length": 1}), "missing key 'hash_ids'"),
        (_line(inp=0, ids=[]), "input_length must be a whole number >= 1, got 0"),
        (_line(out=-3), "output_length must be a whole number >= 1, got -3"),
        (_line(ts=-1), "timestamp must be a finite number of ms >= 0, got -1"),
        (_line(inp=600, ids=[1]), "hash_ids has 1 blocks but input_length 600 needs"),
        (_line(ids=[1, "x"]), "hash_ids[1] must be a whole number >= 0"),
        (_line(ts=0.5, inp=True), "input_length must be a whole number"),  # type: ignore[arg-type]
    ],
)
def test_malformed_line_refused_with_file_and_line(tmp_path: Path, bad: str, fragment: str) -> None:
    path = _write(tmp_path, [_line(), "", bad, _line(ts=5)])
    with pytest.raises(TraceError) as err:
        load_trace(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ")  # blank line 2 still counts
    assert fragment in msg


def test_time_going_backwards_is_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(ts=100), _line(ts=50)])
    with pytest.raises(TraceError, match=r":2: timestamp 50 ms is earlier than the previous line's 100 ms"):
        load_trace(path)


def test_skip_reports_every_skipped_line(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(ts=0), "garbage", _line(ts=1), _line(inp=600, ids=[1]), _line(ts=2)])
    loaded = load_trace(path, on_error="skip")
    assert [r.request_id for r in loaded.requests] == ["L1", "L3", "L5"]
    assert [(i.line_no, i.path) for i in loaded.skipped] == [(2, str(path)), (4, str(path))]
    assert "not valid JSON" in str(loaded.skipped[0])


def test_bad_arguments(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line()])
    with pytest.raises(TraceError, match="rate_multiplier must be in"):
        load_trace(path, rate_multiplier=0)
    with pytest.raises(TraceError, match="duration_s must be > 0"):
        load_trace(path, duration_s=-1)
    with pytest.raises(TraceError, match="on_error must be one of raise, skip, got 'ignore'"):
        load_trace(path, on_error="ignore")
    with pytest.raises(TraceError, match="skipped="):
        list(iter_trace(path, on_error="skip"))
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "missing.jsonl")
