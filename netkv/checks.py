"""Checks of outside values shared by every parser (traces, configurations,
scenarios).  Import-light: workers import it through netkv.perfmodel."""

from __future__ import annotations

import math
from typing import Iterable, Mapping


def is_finite_number(value: object) -> bool:
    """True for an int or a float (never a bool) that is finite as a float:
    NaN, +-inf and integers beyond the float range (about 1.8e308, which
    ``math.isfinite`` cannot even convert) are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def number_complaint(value: object, name: str, lo: float, hi: float = math.inf) -> str | None:
    """None when ``value`` is a finite number (never a bool) in [lo, hi];
    otherwise the one line that says what ``name`` must be."""
    if is_finite_number(value) and lo <= value <= hi:  # type: ignore[operator]
        return None
    if hi == math.inf:
        return f"{name} must be a finite number >= {lo:g}, got {value!r}"
    return f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}"


def unknown_key_complaint(data: Mapping[str, object], known: Iterable[str], what: str) -> str | None:
    """None when every key of ``data`` is known; otherwise the one line that
    names the first unknown key (in sorted order) and the known ones."""
    names = list(known)
    unknown = sorted(set(data) - set(names), key=str)
    return f"unknown {what} {unknown[0]!r}; known: {', '.join(names)}" if unknown else None
