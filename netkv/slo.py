"""Service-level objectives over per-request records (:mod:`netkv.records`).

* TTFT attainment at several thresholds: the attainment-vs-threshold curve,
  a list of ``(threshold_ms, fraction)``;
* a length-aware TTFT SLO, ``fixed_ms + per_input_token_ms * input_tokens``,
  since a long prompt cannot reach its first token as soon as a short one;
* TBT (time between tokens) attainment: a request meets it when its own
  ``tbt_mean_ms`` (the time per output token, TPOT) or, with ``tbt_stat="p99"``,
  its ``tbt_p99_ms`` is at most the threshold.  A request with a single output
  token has no gap between tokens and meets it.

Every fraction is over *all* records of the replay: a failed request misses
every SLO (as in :func:`netkv.records.summarize`).  No records: None.

Defaults are defined here once; their sources are in docs/workers.md
("SLOs"): the DistServe artifact's SLO settings, the testbed's flat 2 s TTFT
SLO, and named assumptions.  This module stays free of numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping, Sequence

from .checks import is_finite_number, unknown_key_complaint

# The flat TTFT SLO of `netkv run` (lab/experiment.py reads it from here).
# Assumption: the testbed's long-standing default; no published source is claimed for it.
FLAT_TTFT_SLO_MS = 2000.0
# TTFT thresholds of the attainment curve, ms (sources: docs/workers.md, "SLOs"):
#   125  DistServe, code completion (HumanEval, OPT-66B)
#   250  DistServe, chatbot (ShareGPT, OPT-13B)
#   400  DistServe, chatbot (ShareGPT, OPT-66B)
#  1000  assumption: a point between the chatbot SLOs and the flat 2 s
#  2000  FLAT_TTFT_SLO_MS, the flat SLO of netkv run
#  4000  DistServe, chatbot (ShareGPT, OPT-175B)
#  8000  assumption: a point between 4 s and 15 s
# 15000  DistServe, summarization (LongBench, OPT-66B)
DEFAULT_TTFT_THRESHOLDS_MS: tuple[float, ...] = (125.0, 250.0, 400.0, 1000.0, FLAT_TTFT_SLO_MS, 4000.0, 8000.0,
                                                  15000.0)
# Length-aware TTFT SLO: fixed part = DistServe's chatbot TTFT SLO for OPT-13B;
# per-input-token part = assumption (about 5x the modelled Llama-3.1-8B H100
# prefill time per token of an 8k prompt, 0.037 ms, and 2.3x Llama-3.1-70B at TP 4).
DEFAULT_LENGTH_AWARE_FIXED_MS = 250.0
DEFAULT_LENGTH_AWARE_PER_INPUT_TOKEN_MS = 0.2
# TBT SLO: DistServe's chatbot TPOT SLO (OPT-13B and OPT-66B), applied to each
# request's mean time between tokens.
DEFAULT_TBT_SLO_MS = 100.0
TBT_STATS = {"mean": "tbt_mean_ms", "p99": "tbt_p99_ms"}
DEFAULT_TBT_STAT = "mean"


class SloError(ValueError):
    """An SLO setting is unknown or out of range."""


def _positive(name: str, value: object, *, zero_ok: bool = False) -> float:
    if not is_finite_number(value) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise SloError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'} (ms), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SloConfig:
    """The SLO settings of a summary; every field defaults to the module's default."""

    ttft_thresholds_ms: tuple[float, ...] = DEFAULT_TTFT_THRESHOLDS_MS
    length_aware_fixed_ms: float = DEFAULT_LENGTH_AWARE_FIXED_MS
    length_aware_per_input_token_ms: float = DEFAULT_LENGTH_AWARE_PER_INPUT_TOKEN_MS
    tbt_slo_ms: float = DEFAULT_TBT_SLO_MS
    tbt_stat: str = DEFAULT_TBT_STAT

    def __post_init__(self) -> None:
        th = self.ttft_thresholds_ms
        if isinstance(th, (str, bytes)) or not isinstance(th, (list, tuple)) or not th:
            raise SloError(f"ttft_thresholds_ms must be a non-empty list of numbers (ms), got {th!r}")
        values = tuple(_positive(f"ttft_thresholds_ms[{i}]", v) for i, v in enumerate(th))
        if list(values) != sorted(set(values)):
            raise SloError(f"ttft_thresholds_ms must be strictly increasing, got {list(th)!r}")
        object.__setattr__(self, "ttft_thresholds_ms", values)
        _positive("length_aware_fixed_ms", self.length_aware_fixed_ms, zero_ok=True)
        _positive("length_aware_per_input_token_ms", self.length_aware_per_input_token_ms, zero_ok=True)
        if self.length_aware_fixed_ms == 0 and self.length_aware_per_input_token_ms == 0:
            raise SloError("length_aware_fixed_ms and length_aware_per_input_token_ms cannot both be 0")
        _positive("tbt_slo_ms", self.tbt_slo_ms)
        if not isinstance(self.tbt_stat, str) or self.tbt_stat not in TBT_STATS:
            raise SloError(f"tbt_stat must be one of {', '.join(TBT_STATS)}, got {self.tbt_stat!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SloConfig":
        if not isinstance(data, Mapping):
            raise SloError(f"SLO settings must be a JSON object, got {type(data).__name__}")
        complaint = unknown_key_complaint(data, (f.name for f in fields(cls)), "SLO key")
        if complaint:
            raise SloError(complaint)
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ttft_thresholds_ms"] = list(self.ttft_thresholds_ms)
        return out


def _ok(rec: Mapping[str, Any]) -> bool:
    return rec.get("status") == "ok" and rec.get("ttft_ms") is not None


def ttft_attainment(records: Sequence[Mapping[str, Any]], threshold_ms: float) -> float | None:
    """Fraction of all records that ended ok with ``ttft_ms <= threshold_ms``."""
    limit = _positive("threshold_ms", threshold_ms)
    if not records:
        return None
    return sum(1 for r in records if _ok(r) and float(r["ttft_ms"]) <= limit) / len(records)


def ttft_attainment_curve(records: Sequence[Mapping[str, Any]],
                          thresholds_ms: Iterable[float] = DEFAULT_TTFT_THRESHOLDS_MS
                          ) -> list[tuple[float, float | None]]:
    """``[(threshold_ms, fraction), ...]`` for each threshold, in the given order."""
    return [(float(t), ttft_attainment(records, t)) for t in thresholds_ms]


def length_aware_ttft_slo_ms(input_tokens: int, fixed_ms: float = DEFAULT_LENGTH_AWARE_FIXED_MS,
                             per_input_token_ms: float = DEFAULT_LENGTH_AWARE_PER_INPUT_TOKEN_MS) -> float:
    """The TTFT a request of ``input_tokens`` prompt tokens is allowed."""
    if isinstance(input_tokens, bool) or not isinstance(input_tokens, int) or input_tokens < 0:
        raise SloError(f"input_tokens must be a whole number >= 0, got {input_tokens!r}")
    return fixed_ms + per_input_token_ms * input_tokens


def length_aware_ttft_attainment(records: Sequence[Mapping[str, Any]],
                                 fixed_ms: float = DEFAULT_LENGTH_AWARE_FIXED_MS,
                                 per_input_token_ms: float = DEFAULT_LENGTH_AWARE_PER_INPUT_TOKEN_MS
                                 ) -> float | None:
    """Fraction of all records that ended ok within their length-aware TTFT SLO."""
    SloConfig(length_aware_fixed_ms=fixed_ms, length_aware_per_input_token_ms=per_input_token_ms)  # checks
    if not records:
        return None
    met = sum(1 for r in records
              if _ok(r) and float(r["ttft_ms"]) <= length_aware_ttft_slo_ms(int(r["input_tokens"]), fixed_ms,
                                                                             per_input_token_ms))
    return met / len(records)


def tbt_attainment(records: Sequence[Mapping[str, Any]], threshold_ms: float = DEFAULT_TBT_SLO_MS,
                   stat: str = DEFAULT_TBT_STAT) -> float | None:
    """Fraction of all records that ended ok with their time between tokens
    (``stat``: "mean" uses ``tbt_mean_ms``, "p99" ``tbt_p99_ms``) at most
    ``threshold_ms``; a request with no gap (one output token) meets it."""
    limit = _positive("threshold_ms", threshold_ms)
    if not isinstance(stat, str) or stat not in TBT_STATS:
        raise SloError(f"stat must be one of {', '.join(TBT_STATS)}, got {stat!r}")
    if not records:
        return None
    key = TBT_STATS[stat]
    met = sum(1 for r in records if r.get("status") == "ok" and (r.get(key) is None or float(r[key]) <= limit))
    return met / len(records)


def slo_summary(records: Sequence[Mapping[str, Any]], config: SloConfig | None = None) -> dict[str, Any]:
    """Every SLO figure of one replay, with the settings used."""
    cfg = config or SloConfig()
    return {
        "settings": cfg.to_dict(),
        "ttft_attainment_curve": [[t, f] for t, f in ttft_attainment_curve(records, cfg.ttft_thresholds_ms)],
        "length_aware_ttft_attainment": length_aware_ttft_attainment(
            records, cfg.length_aware_fixed_ms, cfg.length_aware_per_input_token_ms),
        "tbt_attainment": tbt_attainment(records, cfg.tbt_slo_ms, cfg.tbt_stat),
    }
