"""Read request traces in the Mooncake JSONL format.

One JSON object per line::

    {"timestamp": 3000, "input_length": 13544, "output_length": 71, "hash_ids": [0, 14, ...]}

* ``timestamp``: arrival in milliseconds from the start of the trace (number >= 0,
  never decreasing from one line to the next);
* ``input_length`` (>= 1) and ``output_length`` (>= 1): tokens in and out (whole numbers);
* ``hash_ids``: one non-negative whole number per 512-token prompt block, so exactly
  ``ceil(input_length / 512)`` of them.

Extra keys are allowed and ignored (other Mooncake releases add some).  Blank
lines are not requests and are passed over.  Every other line that does not
fit is *malformed*: by default reading stops with a :class:`TraceError` naming
``file:line`` and what is wrong; with ``on_error="skip"`` the line is left out
and reported in :attr:`TraceLoad.skipped` (nothing is dropped silently).

Windowing and rate: a request is kept when ``start_s <= timestamp/1000 <
start_s + duration_s``; its replay arrival is
``(timestamp - start_s*1000) / rate_multiplier`` ms, so a multiplier of 2
replays the window twice as fast (twice the request rate).  Request ids are
``"L<line number>"``: stable across windows and unique within one file.

Context-length scaling (``context_factor`` k, a whole number >= 1): every
request's ``input_length`` becomes ``k * input_length`` and each prompt block
is stretched into k blocks, so the scaled prompt is the original one with
every token repeated k times in place.  Block ``b`` becomes blocks
``b*k .. b*k + k - 1`` (an injective map, so distinct blocks stay distinct and
equal blocks stay equal); a partial last block of ``r`` tokens becomes the
first ``ceil(k*r/512)`` of its k ids, which keeps exactly
``ceil(k*input_length/512)`` ids.  Two requests sharing a prefix of n blocks
share n*k blocks after scaling; arrivals and output lengths are unchanged.
Only whole factors are allowed: a fractional one would cut blocks apart, and
a block id names its whole prefix, so the shared prefixes could not be kept.

Replicated arrivals (``replicas`` R, a whole number >= 1), for fabrics larger
than the one the trace was recorded for: R copies of the trace are replayed
at once, copy c shifted in time by c/R of the trace's cycle and wrapped around
its end, so the copies' bursts do not coincide.  The cycle is the last
timestamp plus the mean gap between arrivals (so the last request does not land
on the first).  Copy c's request at trace time ``ts`` has trace time
``u = (ts - c * cycle / R) mod cycle``, and the window and
rate apply to ``u`` as above; its block ids become ``b * R + c`` (each copy's
conversations share prefixes among themselves, never with another copy's) and
its id ``"L<line>.r<c>"`` (copy 0 keeps ``"L<line>"``).  The load is R times
the trace's, and its prefix reuse per second per copy is the trace's own,
where a rate multiplier of R would compress time and raise it.  R = 1 is the
trace as it is.  A window must then lie within one cycle.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .checks import is_finite_number
from .repo import REPO_ROOT
from .request import BLOCK_TOKENS, Request

# The default trace ships with the repository (see traces/README.md for its
# source and licence); every default, test and help text reads it from here.
DEFAULT_TRACE = REPO_ROOT / "traces" / "mooncake_conversation.jsonl"
ON_ERROR_CHOICES = ("raise", "skip")
MAX_REPLICAS = 4096  # sanity bound on replicas (8,192 GPUs are 128 copies of the 64-GPU load)
MAX_CONTEXT_FACTOR = 1000  # sanity bound on context_factor (the trace's longest prompt is 126,195 tokens)
REQUIRED_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


class TraceError(ValueError):
    """A trace line (or an argument of the reader) is not acceptable."""


@dataclass(frozen=True)
class TraceIssue:
    path: str
    line_no: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.message}"


@dataclass
class TraceLoad:
    requests: list[Request]
    skipped: list[TraceIssue] = field(default_factory=list)


def _whole(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}")
    return value


def parse_line(text: str) -> tuple[float, int, int, tuple[int, ...]]:
    """``(timestamp_ms, input_tokens, output_tokens, hash_ids)`` of one line;
    raises ValueError with a one-line reason."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise ValueError("not a trace line (JSON nested too deeply)") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)})")
    ts = obj["timestamp"]
    if not is_finite_number(ts) or ts < 0:
        raise ValueError(f"timestamp must be a finite number of ms >= 0, got {ts!r}")
    input_tokens = _whole(obj["input_length"], "input_length", 1)
    output_tokens = _whole(obj["output_length"], "output_length", 1)
    raw_ids = obj["hash_ids"]
    if not isinstance(raw_ids, list):
        raise ValueError(f"hash_ids must be a list of whole numbers, got {type(raw_ids).__name__}")
    ids = []
    for pos, h in enumerate(raw_ids):
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"hash_ids[{pos}] must be a whole number >= 0, got {h!r}")
        ids.append(h)
    expected = -(-input_tokens // BLOCK_TOKENS)  # ceil in whole numbers: input_length may be huge
    if len(ids) != expected:
        raise ValueError(
            f"hash_ids has {len(ids)} blocks but input_length {input_tokens} needs "
            f"ceil({input_tokens}/{BLOCK_TOKENS}) = {expected}"
        )
    return float(ts), input_tokens, output_tokens, tuple(ids)


def check_context_factor(context_factor: object) -> int:
    """``context_factor`` if it is a whole number in [1, MAX_CONTEXT_FACTOR]; TraceError otherwise."""
    if isinstance(context_factor, bool) or not isinstance(context_factor, int) or \
            not 1 <= context_factor <= MAX_CONTEXT_FACTOR:
        raise TraceError(
            f"context_factor must be a whole number in [1, {MAX_CONTEXT_FACTOR}] (prompt blocks cannot be "
            f"split), got {context_factor!r}"
        )
    return context_factor


def scale_context(input_tokens: int, hash_ids: tuple[int, ...], context_factor: int) -> tuple[int, tuple[int, ...]]:
    """``(k * input_tokens, stretched hash ids)`` for ``k = context_factor``
    (see the module docstring); ``k = 1`` returns the input unchanged."""
    k = check_context_factor(context_factor)
    if k == 1:
        return input_tokens, hash_ids
    ids: list[int] = []
    for b in hash_ids:
        ids.extend(range(b * k, b * k + k))
    scaled = input_tokens * k
    del ids[-(-scaled // BLOCK_TOKENS):]  # the partial last block's share
    return scaled, tuple(ids)


def _check_args(start_s: float, duration_s: float | None, rate_multiplier: float, on_error: str) -> None:
    if not (is_finite_number(start_s) and start_s >= 0):
        raise TraceError(f"start_s must be a finite number of seconds >= 0, got {start_s!r}")
    if duration_s is not None and not (
        isinstance(duration_s, (int, float)) and not isinstance(duration_s, bool)
        and (is_finite_number(duration_s) or duration_s == math.inf) and duration_s > 0
    ):
        raise TraceError(f"duration_s must be > 0 seconds (or None for the rest of the trace), got {duration_s!r}")
    if not (is_finite_number(rate_multiplier) and 0 < rate_multiplier <= 1e6):
        raise TraceError(f"rate_multiplier must be in (0, 1e6], got {rate_multiplier!r}")
    if not isinstance(on_error, str) or on_error not in ON_ERROR_CHOICES:
        raise TraceError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")


def iter_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_multiplier: float = 1.0,
    on_error: str = "raise",
    skipped: list[TraceIssue] | None = None,
    max_requests: int | None = None,
    context_factor: int = 1,
) -> Iterator[Request]:
    """Yield the window's requests in file order (see the module docstring).

    With ``on_error="skip"`` every malformed line is appended to ``skipped``
    (which must then be given).  Reading stops at the first timestamp at or
    past the end of the window, or after ``max_requests`` requests.  Each
    request's prompt is scaled by ``context_factor`` (:func:`scale_context`)."""
    _check_args(start_s, duration_s, rate_multiplier, on_error)
    check_context_factor(context_factor)
    if on_error == "skip" and skipped is None:
        raise TraceError('on_error="skip" needs a list in skipped= to report the skipped lines')
    if max_requests is not None and (isinstance(max_requests, bool) or not isinstance(max_requests, int)
                                     or max_requests < 1):
        raise TraceError(f"max_requests must be >= 1 or None, got {max_requests!r}")
    name = str(path)
    start_ms = start_s * 1000.0
    end_ms = math.inf if duration_s is None else (start_s + duration_s) * 1000.0
    prev_ts = -math.inf
    count = 0
    try:
        handle = open(path, "r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"cannot read trace {name}: {exc.strerror}") from None
    with handle:
        line_no = 0
        while True:
            try:
                text = handle.readline()
            except UnicodeDecodeError as exc:
                issue = TraceIssue(name, line_no + 1, f"not UTF-8 text ({exc.reason})")
                raise TraceError(str(issue)) from None
            if not text:
                break
            line_no += 1
            if not text.strip():
                continue
            try:
                ts, inp, out, ids = parse_line(text)
                if ts < prev_ts:
                    raise ValueError(f"timestamp {ts:g} ms is earlier than the previous line's {prev_ts:g} ms")
            except ValueError as exc:
                issue = TraceIssue(name, line_no, str(exc))
                if on_error == "raise":
                    raise TraceError(str(issue)) from None
                assert skipped is not None
                skipped.append(issue)
                continue
            prev_ts = ts
            if ts < start_ms:
                continue
            if ts >= end_ms:
                break
            if context_factor != 1:
                inp, ids = scale_context(inp, ids, context_factor)
            yield Request(f"L{line_no}", (ts - start_ms) / rate_multiplier, inp, out, ids)
            count += 1
            if max_requests is not None and count >= max_requests:
                break


def trace_span_s(path: str | Path, on_error: str = "raise") -> float:
    """Seconds from the trace's origin to its last request's timestamp: the
    length of trace that windows can be taken from (netkv.stats.select_windows)."""
    last_ms = 0.0
    skipped: list[TraceIssue] = []
    for req in iter_trace(path, on_error=on_error, skipped=skipped):
        last_ms = req.arrival_ms  # start_s 0 and rate 1: the arrival is the timestamp
    return last_ms / 1000.0


def check_replicas(replicas: object) -> int:
    if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= MAX_REPLICAS:
        raise TraceError(f"replicas must be a whole number in [1, {MAX_REPLICAS}], got {replicas!r}")
    return replicas


def _replicate(whole: list[Request], replicas: int, source: str, start_s: float, duration_s: float | None,
               rate_multiplier: float) -> list[Request]:
    """The window of ``replicas`` phase-shifted copies of ``whole`` (the trace
    read from its origin at rate 1, so arrivals are timestamps), in arrival
    order (see the module docstring)."""
    last_ms = whole[-1].arrival_ms if whole else 0.0
    if len(whole) < 2 or last_ms <= 0:
        raise TraceError(f"{source}: a trace that spans no time cannot be replicated")
    span_ms = last_ms + last_ms / (len(whole) - 1)  # the cycle: the span plus the mean gap
    start_ms = start_s * 1000.0
    length_ms = span_ms - start_ms if duration_s is None else duration_s * 1000.0
    if start_ms + length_ms > span_ms:
        raise TraceError(f"with replicas, the window ({start_s:g} s + {length_ms / 1000:g} s) must lie within "
                         f"the trace's cycle of {span_ms / 1000:g} s (the copies wrap around it)")
    out: list[Request] = []
    for copy in range(replicas):
        shift_ms = copy * span_ms / replicas
        for req in whole:
            u = (req.arrival_ms - shift_ms) % span_ms
            if not start_ms <= u < start_ms + length_ms:
                continue
            rid = req.request_id if copy == 0 else f"{req.request_id}.r{copy}"
            ids = tuple(b * replicas + copy for b in req.hash_ids)
            out.append(Request(rid, (u - start_ms) / rate_multiplier, req.input_tokens, req.output_tokens, ids))
    out.sort(key=lambda r: (r.arrival_ms, r.request_id))
    return out


def load_trace(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_multiplier: float = 1.0,
    on_error: str = "raise",
    max_requests: int | None = None,
    context_factor: int = 1,
    replicas: int = 1,
) -> TraceLoad:
    """All requests of the window plus the skipped lines (``on_error="skip"``),
    prompts scaled by ``context_factor``, ``replicas`` copies (see the module docstring)."""
    skipped: list[TraceIssue] = []
    if check_replicas(replicas) > 1:
        _check_args(start_s, duration_s, rate_multiplier, on_error)
        whole = list(iter_trace(path, on_error=on_error, skipped=skipped, context_factor=context_factor))
        copies = _replicate(whole, replicas, str(path), start_s, duration_s, rate_multiplier)
        return TraceLoad(copies if max_requests is None else copies[:max_requests], skipped)
    requests = list(
        iter_trace(
            path,
            start_s=start_s,
            duration_s=duration_s,
            rate_multiplier=rate_multiplier,
            on_error=on_error,
            skipped=skipped,
            max_requests=max_requests,
            context_factor=context_factor,
        )
    )
    return TraceLoad(requests, skipped)
