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


def test_replicas_one_is_the_trace_itself() -> None:
    plain = load_trace(DEFAULT_TRACE, start_s=600, duration_s=60).requests
    assert load_trace(DEFAULT_TRACE, start_s=600, duration_s=60, replicas=1).requests == plain


def test_replicated_copies_are_phase_shifted_with_their_own_prefixes(tmp_path: Path) -> None:
    # last timestamp 1,000 ms, mean gap 500 ms: a cycle of 1,500 ms; two conversations share block 7
    path = _write(tmp_path, [_line(ts=0, inp=1024, ids=[7, 8]), _line(ts=400, inp=512, ids=[7]),
                             _line(ts=1000, inp=512, ids=[9])])
    reqs = load_trace(path, replicas=4).requests
    assert len(reqs) == 12 and len({r.request_id for r in reqs}) == 12
    assert [r.arrival_ms for r in reqs] == sorted(r.arrival_ms for r in reqs)
    by_id = {r.request_id: r for r in reqs}
    # copy c is shifted by c * 375 ms and wrapped: line 2 (ts 400) lands at 400, 25, 1150, 775
    assert [by_id[i].arrival_ms for i in ("L2", "L2.r1", "L2.r2", "L2.r3")] == [400, 25, 1150, 775]
    # block b of copy c is b * 4 + c: shared within a copy, never across copies
    assert by_id["L1"].hash_ids == (28, 32) and by_id["L2"].hash_ids == (28,)
    assert by_id["L1.r3"].hash_ids == (31, 35) and by_id["L2.r3"].hash_ids == (31,)

    def copy_of(r: object) -> int:
        rid = getattr(r, "request_id")
        return int(rid.split(".r")[1]) if ".r" in rid else 0

    blocks = [{b for r in reqs if copy_of(r) == c for b in r.hash_ids} for c in range(4)]
    assert all(not (blocks[a] & blocks[b]) for a in range(4) for b in range(a + 1, 4))
    # the window and the rate apply to the shifted time
    half = load_trace(path, replicas=4, start_s=0.5, duration_s=0.5, rate_multiplier=2).requests
    assert [(r.request_id, r.arrival_ms) for r in half] == [("L3.r1", 62.5), ("L1.r2", 125.0), ("L2.r3", 137.5)]


def test_replicated_window_longer_than_the_trace_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, [_line(ts=0), _line(ts=1000)])
    with pytest.raises(TraceError, match="must lie within the trace's cycle of 2 s"):
        load_trace(path, replicas=2, start_s=0.5, duration_s=2)
    with pytest.raises(TraceError, match="replicas must be a whole number"):
        load_trace(path, replicas=0)
