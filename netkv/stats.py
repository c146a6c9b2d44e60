"""Statistics across trace windows: means with Student-t confidence
intervals, paired per-window differences, a significance verdict, and the
choice of disjoint evaluation windows.

A headline figure (mean TTFT, SLO attainment, ...) is measured once per trace
window; the windows are the independent samples.  With n windows the 95%
interval of their mean is ``mean ± t(0.975, n-1) · s / sqrt(n)`` (``s`` the
sample standard deviation), Student's t because n is small (3-10).  A
comparison of two schedulers is *paired*: both replay the same windows, so
the per-window change (``100 · (treatment − baseline) / baseline`` %, or
``treatment − baseline`` in the metric's own unit) is computed first and its
mean and interval reported.  An interval that contains zero is "not
significant"; so is a comparison with fewer than two windows, which has no
interval.

No scipy: the t quantile is the inverse (by bisection) of the t CDF, which is
written with the regularized incomplete beta function evaluated by its
continued fraction (modified Lentz method).  Pure Python, no numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

DEFAULT_CONFIDENCE = 0.95
SIGNIFICANT = "significant"
NOT_SIGNIFICANT = "not significant"
MIN_WINDOWS = 3  # issue 9: every headline figure from at least 3 disjoint windows


class StatsError(ValueError):
    """Bad input to a statistic (too few values, non-finite values, bad level)."""


# -- percentiles ---------------------------------------------------------------------------

PERCENTILE_METHODS = ("linear", "lower")


def percentile(values: Sequence[float], pct: float, *, method: str = "linear") -> float | None:
    """The ``pct`` percentile (0-100) of ``values``; None if empty.  The one
    percentile of the project: records, reports, the envelope, the
    controller's reply latencies, benchmarks.

    ``method`` as numpy names them: "linear" interpolates between the two
    nearest ranks (numpy's default; every figure of a report); "lower" takes
    the lower of the two (the envelope's verdict, whose thresholds were
    calibrated with it: docs/design.md, "Envelope")."""
    if method not in PERCENTILE_METHODS:
        raise ValueError(f"method must be one of {', '.join(PERCENTILE_METHODS)}, got {method!r}")
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"pct must be in [0, 100], got {pct!r}")
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    lo = math.floor(pos)
    if method == "lower":
        return ordered[lo]
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# -- Student t -----------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function
    (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        # even step
        num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        # odd step
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            return h
    raise StatsError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise StatsError(f"betainc needs a, b > 0 and x in [0, 1], got a={a!r}, b={b!r}, x={x!r}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not (df > 0 and math.isfinite(df)):
        raise StatsError(f"degrees of freedom must be a finite number > 0, got {df!r}")
    if math.isnan(t):
        raise StatsError("t must be a number, got nan")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, Student's t with ``df`` degrees of freedom
    (``t_quantile(0.975, 2)`` = 4.303)."""
    if not (0.0 < p < 1.0):
        raise StatsError(f"p must be in (0, 1), got {p!r}")
    if not (df > 0 and math.isfinite(df)):
        raise StatsError(f"degrees of freedom must be a finite number > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            raise StatsError(f"t quantile out of range for p={p!r}, df={df!r}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# -- means, intervals, paired comparisons -------------------------------------------------

def _finite_values(values: Sequence[float], what: str) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StatsError(f"{what}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    if not out:
        raise StatsError(f"{what} is empty: need at least one value")
    return out


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.0 < confidence < 1.0:
        raise StatsError(f"confidence must be in (0, 1), got {confidence!r}")


@dataclass(frozen=True)
class MeanCI:
    """Mean of per-window values with its two-sided Student-t interval.
    ``half_width``, ``low`` and ``high`` are None with a single value."""

    mean: float
    half_width: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float
    values: tuple[float, ...]

    @property
    def verdict(self) -> str:
        """"not significant" when the interval contains zero or does not exist."""
        if self.low is None or self.high is None or self.low <= 0.0 <= self.high:
            return NOT_SIGNIFICANT
        return SIGNIFICANT

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["values"] = list(self.values)
        out["verdict"] = self.verdict
        return out


def mean_ci(values: Sequence[float], confidence: float = DEFAULT_CONFIDENCE, *, what: str = "values") -> MeanCI:
    """Mean and ``confidence`` interval of ``values`` (one per window)."""
    _check_confidence(confidence)
    xs = _finite_values(values, what)
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return MeanCI(mean, None, None, None, n, confidence, tuple(xs))
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * math.sqrt(var / n)
    return MeanCI(mean, half, mean - half, mean + half, n, confidence, tuple(xs))


def paired_changes(treatment: Sequence[float], baseline: Sequence[float], *, relative: bool = True) -> list[float]:
    """Per-window change of ``treatment`` against ``baseline`` (same windows,
    same order): ``100 · (t − b) / b`` percent when ``relative``, else ``t − b``."""
    ts = _finite_values(treatment, "treatment")
    bs = _finite_values(baseline, "baseline")
    if len(ts) != len(bs):
        raise StatsError(f"paired values need one per window on both sides, got {len(ts)} and {len(bs)}")
    if not relative:
        return [t - b for t, b in zip(ts, bs)]
    zero = [i for i, b in enumerate(bs) if b == 0.0]
    if zero:
        raise StatsError(f"baseline[{zero[0]}] is 0: a relative change is undefined (use relative=False)")
    return [100.0 * (t - b) / b for t, b in zip(ts, bs)]


@dataclass(frozen=True)
class PairedComparison:
    """Per-window changes of a treatment against a baseline and their mean
    with its interval; ``unit`` is "%" (relative) or the metric's own."""

    changes: tuple[float, ...]
    ci: MeanCI
    relative: bool

    @property
    def verdict(self) -> str:
        return self.ci.verdict

    def to_dict(self) -> dict[str, Any]:
        return {"relative": self.relative, "changes": list(self.changes), "mean": self.ci.mean,
                "half_width": self.ci.half_width, "low": self.ci.low, "high": self.ci.high,
                "n": self.ci.n, "confidence": self.ci.confidence, "verdict": self.verdict}


def compare_paired(treatment: Sequence[float], baseline: Sequence[float], *, relative: bool = True,
                   confidence: float = DEFAULT_CONFIDENCE) -> PairedComparison:
    """E.g. NetKV against round-robin mean TTFT, one value per window each:
    the per-window % change, its mean and interval, and the verdict."""
    changes = paired_changes(treatment, baseline, relative=relative)
    return PairedComparison(tuple(changes), mean_ci(changes, confidence, what="changes"), relative)


# -- disjoint evaluation windows -----------------------------------------------------------

def select_windows(trace_duration_s: float, window_s: float, count: int,
                   excluded_s: Sequence[tuple[float, float]] = ()) -> list[float]:
    """``count`` start times (s) of disjoint windows ``[start, start + window_s)``
    inside ``[0, trace_duration_s]``, none overlapping an interval of
    ``excluded_s`` (each ``(start_s, end_s)``, e.g. the tuning window).

    The free time is cut into whole-window slots from the start of each free
    stretch; the chosen slots are spread evenly over them (the first slot and,
    for ``count`` > 1, the last are always taken), so the windows sample the
    whole trace.  Deterministic; raises StatsError when fewer than ``count``
    slots exist."""
    for label, value in (("trace_duration_s", trace_duration_s), ("window_s", window_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise StatsError(f"{label} must be a finite number of seconds > 0, got {value!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise StatsError(f"count must be a whole number >= 1, got {count!r}")
    cuts: list[tuple[float, float]] = []
    for i, pair in enumerate(excluded_s):
        try:
            a, b = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise StatsError(f"excluded_s[{i}] must be (start_s, end_s), got {pair!r}") from None
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            raise StatsError(f"excluded_s[{i}] must be (start_s, end_s) with start < end, got {pair!r}")
        cuts.append((a, b))
    free: list[tuple[float, float]] = []
    cursor = 0.0
    for a, b in sorted(cuts):
        if a > cursor:
            free.append((cursor, min(a, trace_duration_s)))
        cursor = max(cursor, b)
    if cursor < trace_duration_s:
        free.append((cursor, trace_duration_s))
    # whole windows per free stretch; the 1e-9 keeps an exact fit (600 s / 60 s) from rounding down to 9
    slots = [lo + i * window_s for lo, hi in free for i in range(max(0, int((hi - lo) / window_s + 1e-9)))]
    if len(slots) < count:
        raise StatsError(
            f"only {len(slots)} disjoint {window_s:g} s windows fit in {trace_duration_s:g} s of trace outside "
            f"{[list(c) for c in cuts]}; asked for {count}"
        )
    if count == 1:
        return [slots[0]]
    picks = [round(i * (len(slots) - 1) / (count - 1)) for i in range(count)]
    return [slots[i] for i in picks]


def evaluation_windows(trace_duration_s: float, window_s: float, count: int = MIN_WINDOWS) -> list[float]:
    """:func:`select_windows` excluding the tuning window of ``tuned_cache_load``
    recorded in ``netkv/schedulers/tuned_weights.json`` (when that file exists)."""
    from .schedulers.baselines import tuning_window_s  # lazy: the schedulers import numpy

    window = tuning_window_s()
    return select_windows(trace_duration_s, window_s, count, [window] if window is not None else [])
