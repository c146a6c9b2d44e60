"""Scheduler interface, decisions, configuration checking and the registry."""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Mapping, Sequence, TypeVar

from ..oracle import Estimate, Oracle
from ..request import BLOCK_TOKENS, DecodeView, Request


class NoEligibleDecode(Exception):
    """No decode instance can admit the request (the message says why)."""


@dataclass(frozen=True)
class Decision:
    decode: str
    score_terms: dict[str, float]
    tokens_to_send: int
    bytes_to_send: int
    estimate: Estimate | None


@dataclass(frozen=True)
class Param:
    """One configuration key: default and allowed closed range."""

    default: float
    minimum: float
    maximum: float
    help: str


class Scheduler:
    """Picks the decode instance for a request whose prefill ran on ``prefill``.

    Subclasses set ``name``, ``doc`` (one line) and ``params`` (the allowed
    configuration keys); ``self.cfg`` holds the checked values, defaults filled
    in.  ``choose`` never returns an ineligible decode and raises
    :class:`NoEligibleDecode` when there is none."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    uses_network: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        if isinstance(kv_bytes_per_token, bool) or not isinstance(kv_bytes_per_token, int) or kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token must be a whole number >= 1, got {kv_bytes_per_token!r}")
        self.kv_bytes_per_token = kv_bytes_per_token
        self.seed = seed
        self.cfg = check_config(self.name, config, self.params)

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        raise NotImplementedError

    def start(self, prefills: Sequence[str], decodes: Sequence[str]) -> None:
        """Called once by the ledger, before any decision, with every prefill
        and decode instance of the replay (a scheduler that needs processes
        of its own starts them here).  Does nothing by default."""

    def close(self) -> None:
        """Called when the replay is over (``Ledger.close()``): end whatever
        :meth:`start` started.  Does nothing by default."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cfg})"


def check_config(scheduler: str, config: Mapping[str, object], params: Mapping[str, Param]) -> dict[str, float]:
    allowed = ", ".join(sorted(params)) or "(none)"
    for key in config:
        if key not in params:
            raise ValueError(f"unknown config key {key!r} for scheduler {scheduler}; allowed: {allowed}")
    out: dict[str, float] = {}
    for key, p in params.items():
        raw = config.get(key, p.default)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"scheduler {scheduler}: {key} must be a number, got {raw!r}")
        value = float(raw)
        if not (math.isfinite(value) and p.minimum <= value <= p.maximum):
            raise ValueError(f"scheduler {scheduler}: {key} must be in [{p.minimum:g}, {p.maximum:g}], got {raw!r}")
        out[key] = value
    return out


# -- registry -------------------------------------------------------------------
SCHEDULERS: dict[str, type[Scheduler]] = {}
S = TypeVar("S", bound=type[Scheduler])


def register(cls: S) -> S:
    if not cls.name or not cls.doc:
        raise ValueError(f"{cls.__name__} needs a name and a one-line doc to be registered")
    if cls.name in SCHEDULERS:
        raise ValueError(f"scheduler name {cls.name!r} registered twice")
    SCHEDULERS[cls.name] = cls
    return cls


ENTRY_POINT_GROUP = "netkv.schedulers"  # where an installed package names its schedulers


class SchedulerLoadError(ValueError):
    """A scheduler name that names no scheduler (one line)."""


def _entry_points(name: str | None = None) -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return [ep for ep in eps if name is None or ep.name == name]


def known() -> list[str]:
    """Every scheduler name: the built-in ones, then installed entry points."""
    return list(SCHEDULERS) + sorted(ep.name for ep in _entry_points() if ep.name not in SCHEDULERS)


def resolve(name: str) -> type[Scheduler]:
    """The scheduler class a name stands for: a built-in name
    (:data:`SCHEDULERS`), ``package.module:Class`` (importable from the
    Python path), the name of an entry point of the ``netkv.schedulers``
    group (an installed package's), ``remote+unix:///path`` /
    ``remote+http://127.0.0.1:PORT`` (a scheduler in another process,
    :mod:`netkv.schedulers.remote`), or ``sglang-router:<policy>`` (the real
    SGLang router's pick, :mod:`netkv.schedulers.sglang_router`).  Whatever it is must subclass
    :class:`Scheduler` and carry a one-line ``doc``."""
    cls: object = SCHEDULERS.get(name)
    if cls is not None:
        return cls  # type: ignore[return-value]
    if name.startswith("remote+"):  # a scheduler in another process (the module imports this one)
        from .remote import remote_class

        return remote_class(name)
    if name.startswith("sglang-router:"):  # the real SGLang router in child processes (imports this module)
        from .sglang_router import sglang_class

        return sglang_class(name)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - an import error of the user's module, in one line
            raise SchedulerLoadError(f"scheduler {name!r}: cannot import {module_name!r}: "
                                     f"{type(exc).__name__}: {exc}") from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise SchedulerLoadError(f"scheduler {name!r}: module {module_name!r} has no {attr!r}")
    else:
        eps = _entry_points(name)
        if not eps:
            raise SchedulerLoadError(f"unknown scheduler {name!r}; known: {', '.join(known())} "
                                     f"(or package.module:Class, or an entry point of {ENTRY_POINT_GROUP!r})")
        try:
            cls = eps[0].load()
        except Exception as exc:  # noqa: BLE001
            raise SchedulerLoadError(f"scheduler {name!r}: entry point {eps[0].value!r} does not load: "
                                     f"{type(exc).__name__}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise SchedulerLoadError(f"scheduler {name!r} is {cls!r}, not a subclass of netkv.schedulers.Scheduler")
    if not cls.doc:
        raise SchedulerLoadError(f"scheduler {name!r}: {cls.__name__} needs a one-line doc")
    return cls


def provenance(name: str) -> dict[str, object]:
    """Where a scheduler's code comes from, for experiment.json: built in, or
    its module, file, the version of the distribution that installed it and
    the SHA-256 of its module file (a scheduler edited between two runs shows)."""
    cls = resolve(name)
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    out: dict[str, object] = {"class": f"{cls.__module__}:{cls.__qualname__}",
                              "source": "built-in" if name in SCHEDULERS else "remote" if name.startswith("remote+")
                              else "sglang-router" if name.startswith("sglang-router:")
                              else "module" if ":" in name else "entry point"}
    if out["source"] == "sglang-router":  # the decisions are the installed router's
        out["distribution"] = {"sglang-router": metadata.version("sglang-router")}
    elif out["source"] not in ("built-in", "remote"):
        top = cls.__module__.split(".")[0]
        dists = metadata.packages_distributions().get(top, [])
        out["distribution"] = {d: metadata.version(d) for d in dists}
        out["file"] = path
        if path:
            out["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def create(name: str, config: Mapping[str, object] | None = None, *, kv_bytes_per_token: int,
           seed: int = 0) -> Scheduler:
    """A scheduler by name (:func:`resolve`), its configuration checked."""
    return resolve(name)(config or {}, kv_bytes_per_token=kv_bytes_per_token, seed=seed)


def describe() -> dict[str, str]:
    return {name: cls.doc for name, cls in SCHEDULERS.items()}


# -- shared helpers ---------------------------------------------------------------
def no_eligible(request: Request, decodes: Sequence[DecodeView]) -> NoEligibleDecode:
    """The exception for a request no decode can admit, saying why."""
    if not decodes:
        return NoEligibleDecode(f"request {request.request_id}: no decode instances given")
    need = request.input_tokens + request.output_tokens
    full = [d.name for d in decodes if not d.has_room()]
    short = [d for d in decodes if d.has_room() and d.free_kv_tokens < need]
    parts = []
    if full:
        parts.append(f"{len(full)} without a batch slot or queue room ({', '.join(full[:4])}{', ...' if len(full) > 4 else ''})")
    if short:
        most = max(d.free_kv_tokens for d in short)
        parts.append(f"{len(short)} short of KV memory (most free: {most} tokens)")
    return NoEligibleDecode(
        f"request {request.request_id} needs {need} KV tokens; none of {len(decodes)} decodes is eligible: "
        + "; ".join(parts)
    )


def eligible_views(request: Request, decodes: Iterable[DecodeView]) -> list[DecodeView]:
    need = request.input_tokens + request.output_tokens
    return [d for d in decodes
            if (d.active_batch < d.max_batch or d.queue_len < d.max_queue) and d.free_kv_tokens >= need]


def send_tokens(request: Request, matched_blocks: int) -> int:
    return request.input_tokens - min(request.input_tokens, matched_blocks * BLOCK_TOKENS)


K = TypeVar("K")


def argmin_by_name(items: Iterable[tuple[float, str, K]]) -> tuple[float, str, K]:
    """The item with the lowest score; equal scores go to the smaller name
    (plain string order).  The shared tie-break of every scheduler."""
    best: tuple[float, str, K] | None = None
    for item in items:
        if best is None or item[0] < best[0] or (item[0] == best[0] and item[1] < best[1]):
            best = item
    if best is None:
        raise ValueError("argmin of nothing")
    return best


# The queue-wait model shared by ``netkv`` and ``static_topology``.
LOAD_PARAMS: Mapping[str, Param] = {
    "slot_wait_ms": Param(240.0, 0.0, 1e6, "expected ms until one batch slot frees, per request ahead"),
    "step_ms_per_active": Param(0.1, 0.0, 1e3, "first-token delay added by each request already decoding"),
}


def load_ms(d: DecodeView, slot_wait_ms: float, step_ms_per_active: float) -> float:
    """Estimated wait before ``d`` emits the request's first token, besides the transfer.

    ``ahead = queue_len + active_batch + 1 - max_batch`` requests must leave
    before the new one gets a batch slot; each takes ``slot_wait_ms``.  Every
    request already in the batch makes a decode step slower by
    ``step_ms_per_active``."""
    ahead = d.queue_len + d.active_batch + 1 - d.max_batch
    return (slot_wait_ms * ahead if ahead > 0 else 0.0) + step_ms_per_active * d.active_batch


CostFn = Callable[[Mapping[str, float]], float]
