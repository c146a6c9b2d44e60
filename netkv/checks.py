"""Checks of outside values shared by every parser (traces, configurations,
scenarios).  Import-light: workers import it through netkv.perfmodel."""

from __future__ import annotations

import math


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
