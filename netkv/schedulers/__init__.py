"""Decode-instance selection policies and their registry.

``create("netkv", {...}, kv_bytes_per_token=...)`` builds a scheduler by name;
``describe()`` lists every registered one with a one-line summary.  See
docs/schedulers.md for each policy's formula, weights and tie-break.
"""

from __future__ import annotations

from .base import (
    ENTRY_POINT_GROUP,
    LOAD_PARAMS,
    SCHEDULERS,
    Decision,
    NoEligibleDecode,
    Param,
    Scheduler,
    SchedulerLoadError,
    check_config,
    create,
    describe,
    known,
    load_ms,
    provenance,
    register,
    resolve,
)
from .baselines import (
    TUNED_DEFAULTS,
    TUNING_GRID,
    CacheAware,
    DynamoTopology,
    KVRouter,
    LeastLoaded,
    RandomChoice,
    RoundRobin,
    SGLangCacheBalance,
    StaticTopology,
    TunedCacheLoad,
    tune,
)
from .netkv import NetKVScheduler
from .pool import DecodePool

__all__ = [
    "ENTRY_POINT_GROUP", "SchedulerLoadError", "known", "provenance", "resolve", "DynamoTopology",
    "LOAD_PARAMS", "SCHEDULERS", "Decision", "NoEligibleDecode", "Param", "Scheduler", "check_config",
    "create", "describe", "load_ms", "register", "TUNED_DEFAULTS", "TUNING_GRID", "CacheAware", "KVRouter",
    "LeastLoaded", "RandomChoice", "RoundRobin", "SGLangCacheBalance", "StaticTopology", "TunedCacheLoad",
    "tune", "NetKVScheduler", "DecodePool",
]
