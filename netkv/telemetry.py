"""Per-link telemetry as the oracle consumes it.

One :class:`LinkSample` describes one *directed* hop ``src -> dst`` (topology
node names) as measured at wall-clock time ``t_s``.  Loads and capacities are
real-world Gbit/s, the same units as ``Link.rate_gbps``.  The controller's REST
API returns a list of such rows under the key ``"links"`` of ``GET /links``;
:meth:`TelemetrySnapshot.from_json` reads either that whole answer or the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

REQUIRED_FIELDS: tuple[str, ...] = ("src", "dst", "t_s", "load_gbps", "capacity_gbps", "utilization")
OPTIONAL_FIELDS: tuple[str, ...] = ("drops", "errors")


@dataclass(frozen=True)
class LinkSample:
    src: str
    dst: str
    t_s: float  # time.time() when measured
    load_gbps: float  # real-world Gbit/s carried by the hop
    capacity_gbps: float  # real-world configured rate of the hop
    utilization: float  # load / capacity, 0..1 (may exceed 1 briefly)
    drops: int = 0
    errors: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.t_s):
            raise ValueError(f"sample {self.src}->{self.dst}: t_s must be finite, got {self.t_s}")
        if not (math.isfinite(self.load_gbps) and self.load_gbps >= 0):
            raise ValueError(f"sample {self.src}->{self.dst}: load_gbps must be finite and >= 0, got {self.load_gbps}")
        if not (math.isfinite(self.capacity_gbps) and self.capacity_gbps > 0):
            raise ValueError(
                f"sample {self.src}->{self.dst}: capacity_gbps must be finite and > 0, got {self.capacity_gbps}"
            )

    @property
    def key(self) -> tuple[str, str]:
        return (self.src, self.dst)

    def to_json(self) -> dict[str, object]:
        return {
            "src": self.src, "dst": self.dst, "t_s": self.t_s, "load_gbps": self.load_gbps,
            "capacity_gbps": self.capacity_gbps, "utilization": self.utilization,
            "drops": self.drops, "errors": self.errors,
        }

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "LinkSample":
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"telemetry row {dict(row)!r} lacks {', '.join(missing)}; needs {', '.join(REQUIRED_FIELDS)}")
        # Other keys the controller adds (tier, interval_s, rate_bps, packets,
        # age_ms) are derived figures and are not needed here.
        return cls(
            src=str(row["src"]), dst=str(row["dst"]), t_s=float(row["t_s"]),
            load_gbps=float(row["load_gbps"]), capacity_gbps=float(row["capacity_gbps"]),
            utilization=float(row["utilization"]),
            drops=int(row.get("drops", 0)), errors=int(row.get("errors", 0)),
        )


@dataclass
class TelemetrySnapshot:
    """The latest sample of each directed hop (missing hops are unmeasured)."""

    samples: dict[tuple[str, str], LinkSample] = field(default_factory=dict)

    @classmethod
    def of(cls, samples: Iterable[LinkSample]) -> "TelemetrySnapshot":
        out: dict[tuple[str, str], LinkSample] = {}
        for s in samples:
            prev = out.get(s.key)
            if prev is None or s.t_s >= prev.t_s:
                out[s.key] = s
        return cls(out)

    def get(self, src: str, dst: str) -> LinkSample | None:
        return self.samples.get((src, dst))

    def oldest_t_s(self, hops: Iterable[tuple[str, str]]) -> float | None:
        """Time of the oldest sample among ``hops``; None if any hop (or every
        hop, for an empty list) has no sample."""
        oldest: float | None = None
        for hop in hops:
            s = self.samples.get(hop)
            if s is None:
                return None
            if oldest is None or s.t_s < oldest:
                oldest = s.t_s
        return oldest

    def to_json(self) -> list[dict[str, object]]:
        return [s.to_json() for _, s in sorted(self.samples.items())]

    @classmethod
    def from_json(cls, obj: Any) -> "TelemetrySnapshot":
        """Read a list of sample rows or the controller's ``{"links": [...]}``."""
        if isinstance(obj, Mapping):
            if "links" not in obj:
                raise ValueError(f"telemetry object has keys {sorted(obj)}; expected a 'links' list")
            obj = obj["links"]
        if not isinstance(obj, list):
            raise ValueError(f"telemetry must be a list of rows, got {type(obj).__name__}")
        rows = []
        for row in obj:
            if not isinstance(row, Mapping):
                raise ValueError(f"telemetry row must be an object, got {row!r}")
            rows.append(LinkSample.from_json(row))
        return cls.of(rows)


TelemetrySource = Callable[[], TelemetrySnapshot]


def constant_source(snapshot: TelemetrySnapshot) -> TelemetrySource:
    """A source that always returns ``snapshot`` (tests, benchmarks)."""

    def source() -> TelemetrySnapshot:
        return snapshot

    return source
