"""Per-request result records: the schema (defined once), a JSONL writer,
a validator and summary metrics read back from the file.

Every ``*_ms`` timestamp is milliseconds since the run's time origin
(``run_start_epoch_s`` in the run's summary: the wall clock, ``time.time()``,
when the replay began; all hosts share that clock).  Durations end in ``_ms``
or ``_us`` too.  ``bytes_sent`` are the bytes that crossed the emulated
network (``kv_bytes / scale_factor``, rounded up); ``kv_bytes`` the real KV
cache size they stand for.

A record of status ``"ok"`` has every timestamp and satisfies::

    arrival <= prefill_start <= prefill_end <= transfer_start <= transfer_end
            <= decode_admit <= first_token <= completion

A ``"failed"`` record has a non-empty ``reason`` and whatever timestamps were
reached (the rest are null).

This module is imported by the frontend; it stays free of numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable, Mapping

from .slo import SloConfig, slo_summary
from .stats import percentile


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # "str", "int", "float", "dict", "str|null", "int|null", "float|null"
    help: str


RECORD_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("request_id", "str", "trace request id (L<line number>)"),
    FieldSpec("status", "str", '"ok" or "failed"'),
    FieldSpec("reason", "str", "why the request failed; empty when ok"),
    FieldSpec("arrival_ms", "float", "scheduled arrival (trace timestamp, windowed and rate-scaled)"),
    FieldSpec("input_tokens", "int", "prompt tokens"),
    FieldSpec("output_tokens", "int", "tokens to generate"),
    FieldSpec("prefill", "str|null", "prefill instance chosen: its GPU host (tensor parallelism: its rank-0 host)"),
    FieldSpec("decode", "str|null", "decode instance chosen: its GPU host (tensor parallelism: its rank-0 host)"),
    FieldSpec("tier_distance", "int|null", "highest link tier between prefill and decode (0 server .. 3 core)"),
    FieldSpec("scheduler", "str", "decode scheduler under test"),
    FieldSpec("decision_us", "float|null", "wall time the decode scheduler took to decide, microseconds"),
    FieldSpec("decision_cpu_us", "float|null",
              "CPU time of the frontend's thread during that decision, microseconds (decision_us minus this: "
              "time the thread was off the CPU: preempted, or waiting for the GIL)"),
    FieldSpec("decision_gc_us", "float|null",
              "wall time CPython's cyclic garbage collector ran during that decision, microseconds (included "
              "in decision_us and decision_cpu_us: a collection's pause, not the scheduler's work)"),
    FieldSpec("decision_preemptions", "int|null",
              "involuntary context switches of the frontend's thread during that decision: the kernel gave "
              "its CPU to another process (on a machine shared with the emulator, the wall time's usual excess)"),
    FieldSpec("decision_waits", "int|null",
              "voluntary context switches of the frontend's thread during that decision: it blocked (as on the "
              "interpreter lock while another thread of the frontend held it)"),
    FieldSpec("views_build_us", "float|null",
              "wall time the frontend took to build the decode views the scheduler was given, microseconds"),
    FieldSpec("score_terms", "dict", "the scheduler's score terms for the chosen decode"),
    FieldSpec("estimate_transfer_ms", "float|null", "the oracle's transfer-time estimate for the chosen pair"),
    FieldSpec("prefill_cached_tokens", "int|null", "prompt tokens found in the prefill instance's prefix cache"),
    FieldSpec("tokens_sent", "int|null", "prompt tokens whose KV crossed the network"),
    FieldSpec("queue_wait_ms", "float|null", "prefill_start_ms - arrival_ms: waiting for the prefill instance"),
    FieldSpec("prefill_start_ms", "float|null", "prefill compute began"),
    FieldSpec("prefill_end_ms", "float|null", "prefill compute ended (KV ready to send)"),
    FieldSpec("bytes_sent", "int|null", "emulated bytes on the wire: ceil(kv_bytes / scale_factor) (tensor "
              "parallelism: the sum over the tp rank flows of ceil(rank's bytes / scale_factor))"),
    FieldSpec("kv_bytes", "int|null", "real KV bytes the transfer stands for"),
    FieldSpec("transfer_start_ms", "float|null", "sender began writing the KV payload (prefill host clock; "
              "tensor parallelism: the earliest rank flow's start)"),
    FieldSpec("transfer_end_ms", "float|null", "receiver had the whole KV payload (decode host clock; "
              "tensor parallelism: when the last rank flow landed)"),
    FieldSpec("decode_admit_ms", "float|null", "decode instance admitted the request into its batch"),
    FieldSpec("first_token_ms", "float|null", "first output token emitted"),
    FieldSpec("completion_ms", "float|null", "last output token emitted"),
    FieldSpec("ttft_ms", "float|null", "first_token_ms - arrival_ms"),
    FieldSpec("tbt_mean_ms", "float|null", "mean time between consecutive output tokens (null if 1 token)"),
    FieldSpec("tbt_p99_ms", "float|null", "99th percentile time between tokens (null if 1 token)"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in RECORD_FIELDS)
STATUSES = ("ok", "failed")

# Timestamps of an ok record in the order they must not decrease.
ORDERED_TIMESTAMPS = (
    "arrival_ms",
    "prefill_start_ms",
    "prefill_end_ms",
    "transfer_start_ms",
    "transfer_end_ms",
    "decode_admit_ms",
    "first_token_ms",
    "completion_ms",
)
# Different hosts stamp adjacent events; allow this much clock/rounding slack.
TIMESTAMP_SLACK_MS = 0.5


class RecordError(ValueError):
    """A record does not fit the schema."""


def empty_record(
    request_id: str, scheduler: str, arrival_ms: float, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """A record with every field present: what the trace says, nulls for the
    rest, status "failed" with an empty reason (to be filled in)."""
    rec: dict[str, Any] = {name: None for name in FIELD_NAMES}
    rec.update(
        request_id=request_id, status="failed", reason="", scheduler=scheduler, score_terms={},
        arrival_ms=float(arrival_ms), input_tokens=input_tokens, output_tokens=output_tokens,
    )
    return rec


def _type_ok(kind: str, value: object) -> bool:
    base, _, nullable = kind.partition("|")
    if value is None:
        return nullable == "null"
    if base == "str":
        return isinstance(value, str)
    if base == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if base == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if base == "dict":
        return isinstance(value, dict)
    raise AssertionError(kind)


def check_record(rec: Mapping[str, Any]) -> list[str]:
    """Problems with one record (empty list: fine)."""
    problems: list[str] = []
    rid = rec.get("request_id", "?")
    missing = [n for n in FIELD_NAMES if n not in rec]
    extra = sorted(set(rec) - set(FIELD_NAMES))
    if missing:
        problems.append(f"{rid}: missing fields {', '.join(missing)}")
    if extra:
        problems.append(f"{rid}: unknown fields {', '.join(extra)}")
    for spec in RECORD_FIELDS:
        if spec.name in rec and not _type_ok(spec.kind, rec[spec.name]):
            problems.append(f"{rid}: {spec.name} must be {spec.kind}, got {rec[spec.name]!r}")
    if problems:
        return problems
    status = rec["status"]
    if status not in STATUSES:
        return [f"{rid}: status must be one of {STATUSES}, got {status!r}"]
    if status == "failed":
        if not rec["reason"]:
            problems.append(f"{rid}: failed record without a reason")
        return problems
    if rec["reason"]:
        problems.append(f"{rid}: ok record with a reason {rec['reason']!r}")
    nulls = [n for n in ORDERED_TIMESTAMPS + ("ttft_ms", "prefill", "decode", "bytes_sent", "kv_bytes") if rec[n] is None]
    if nulls:
        return problems + [f"{rid}: ok record lacks {', '.join(nulls)}"]
    for a, b in zip(ORDERED_TIMESTAMPS, ORDERED_TIMESTAMPS[1:]):
        if rec[a] > rec[b] + TIMESTAMP_SLACK_MS:
            problems.append(f"{rid}: {a} {rec[a]:.3f} is after {b} {rec[b]:.3f}")
    if abs(rec["ttft_ms"] - (rec["first_token_ms"] - rec["arrival_ms"])) > 1e-3:
        problems.append(f"{rid}: ttft_ms {rec['ttft_ms']} != first_token_ms - arrival_ms")
    if rec["output_tokens"] is not None and rec["output_tokens"] > 1 and rec["tbt_mean_ms"] is None:
        problems.append(f"{rid}: {rec['output_tokens']} output tokens but no tbt_mean_ms")
    if rec["bytes_sent"] < 0 or rec["kv_bytes"] < 0:
        problems.append(f"{rid}: negative byte counts")
    return problems


class RecordWriter:
    """Appends one JSON line per finished request and flushes it at once, so
    a crashed run keeps every record written so far.  Refuses a second record
    for the same request id."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle: IO[str] = open(self.path, "a", encoding="utf-8")
        self._seen: set[str] = set()

    def write(self, rec: Mapping[str, Any]) -> None:
        problems = check_record(rec)
        if problems:
            raise RecordError("; ".join(problems))
        rid = rec["request_id"]
        if rid in self._seen:
            raise RecordError(f"{rid}: a record was already written for this request")
        self._seen.add(rid)
        ordered = {name: rec[name] for name in FIELD_NAMES}
        self._handle.write(json.dumps(ordered, separators=(",", ":")) + "\n")
        self._handle.flush()

    @property
    def count(self) -> int:
        return len(self._seen)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise RecordError(f"{path}:{line_no}: expected a JSON object")
            out.append(rec)
    return out


def validate_file(path: str | Path, expected_ids: Iterable[str] | None = None) -> list[str]:
    """Every problem in a records file: schema, timestamp order of ok records,
    duplicates, and (with ``expected_ids``) requests missing or unexpected."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for rec in read_records(path):
        problems.extend(check_record(rec))
        rid = str(rec.get("request_id"))
        seen[rid] = seen.get(rid, 0) + 1
    problems.extend(f"{rid}: {n} records" for rid, n in seen.items() if n > 1)
    if expected_ids is not None:
        expected = set(expected_ids)
        problems.extend(f"{rid}: no record" for rid in sorted(expected - set(seen)))
        problems.extend(f"{rid}: record for a request that was not replayed" for rid in sorted(set(seen) - expected))
    return problems


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(path: str | Path, ttft_slo_ms: float | None = None, slo: SloConfig | None = None) -> dict[str, Any]:
    """Metrics read from the records file.  SLO attainment counts failed
    requests as misses (its denominator is every request).  ``slo`` holds
    the settings of the SLO figures under ``"slo"`` (:mod:`netkv.slo`; its
    defaults when None): the TTFT attainment curve, the length-aware TTFT
    SLO and TBT attainment."""
    if ttft_slo_ms is not None and not (ttft_slo_ms > 0 and math.isfinite(ttft_slo_ms)):
        raise ValueError(f"ttft_slo_ms must be a finite number > 0, got {ttft_slo_ms!r}")
    recs = read_records(path)
    ok = [r for r in recs if r.get("status") == "ok"]
    ttft = [float(r["ttft_ms"]) for r in ok]
    tbt_mean = [float(r["tbt_mean_ms"]) for r in ok if r.get("tbt_mean_ms") is not None]
    tbt_p99 = [float(r["tbt_p99_ms"]) for r in ok if r.get("tbt_p99_ms") is not None]
    transfer = [float(r["transfer_end_ms"]) - float(r["transfer_start_ms"]) for r in ok]
    reasons: dict[str, int] = {}
    for r in recs:
        if r.get("status") != "ok":
            key = str(r.get("reason", "")).split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    out: dict[str, Any] = {
        "requests": len(recs),
        "ok": len(ok),
        "failed": len(recs) - len(ok),
        "failure_reasons": reasons,
        "ttft_mean_ms": _mean(ttft),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tbt_mean_ms": _mean(tbt_mean),
        "tbt_p99_of_request_p99_ms": percentile(tbt_p99, 99),
        "transfer_mean_ms": _mean(transfer),
        "transfer_p99_ms": percentile(transfer, 99),
        "bytes_sent_total": sum(int(r["bytes_sent"]) for r in ok),
        "kv_bytes_total": sum(int(r["kv_bytes"]) for r in ok),
    }
    if ttft_slo_ms is not None:
        met = sum(1 for v in ttft if v <= ttft_slo_ms)
        out["ttft_slo_ms"] = ttft_slo_ms
        out["ttft_slo_attainment"] = met / len(recs) if recs else None
    out["slo"] = slo_summary(recs, slo)
    return out
