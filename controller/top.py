"""``netkv telemetry``: a live, ``top``-like table of the fabric's links.

Reads the controller's REST API (``/status`` and ``/links``), groups the
directed links by tier (core first) and lists each tier's busiest links first,
refreshing every polling interval.  ``--once`` prints one table, ``--json``
prints one machine-readable snapshot (``{"status": ..., "links": ...}``) and
exits.  Loads are real-world Gbit/s (the emulated rate times the scale factor).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from topologies.model import TIER_NAMES

from .client import ControllerClient, ControllerUnavailable, loopback_url

DEFAULT_URL = loopback_url()
CLEAR = "\x1b[H\x1b[2J"
MIN_INTERVAL_S = 0.1


class TelemetryFetchError(RuntimeError):
    """The controller's API did not answer or answered with an error."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "telemetry", help="live table of link loads from the controller (busiest first, by tier)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=DEFAULT_URL, help="controller REST API base URL (default %(default)s)")
    p.add_argument("--interval-s", type=float, default=None,
                   help=f"refresh period in seconds (>= {MIN_INTERVAL_S}; default: the controller's polling interval)")
    p.add_argument("--tier", type=int, default=None, help="show only links of this tier")
    p.add_argument("--limit", type=int, default=10, help="rows per tier, busiest first (default %(default)s; 0 = all)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--json", action="store_true", help="print one JSON snapshot and exit")
    p.add_argument("--timeout-s", type=float, default=2.0, help="HTTP timeout per request (default %(default)s)")


def fetch_json(url: str, timeout_s: float) -> Any:
    try:
        return ControllerClient(url).request("", timeout_s=timeout_s)
    except ControllerUnavailable as exc:
        raise TelemetryFetchError(str(exc)) from None


def snapshot(base_url: str, tier: int | None, timeout_s: float) -> dict[str, Any]:
    base = base_url.rstrip("/")
    status = fetch_json(base + "/status", timeout_s)
    query = "?group=tier" + (f"&tier={tier}" if tier is not None else "")
    links = fetch_json(base + "/links" + query, timeout_s)
    return {"status": status, "links": links}


def _fmt(value: Any, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def render(snap: dict[str, Any], limit: int, width: int = 100) -> str:
    """The table as text: a status header, then one block per tier."""
    status = snap["status"]
    links = snap["links"]
    poller = status.get("poller", {})
    lines = [
        f"NetKV telemetry  topology {status.get('topology')}  scale {status.get('scale'):g}  "
        f"poll {status.get('poll_interval_s')} s  switches {status.get('switches_connected')}/"
        f"{status.get('switches_expected')}  hops measured {status.get('hops_measured')}/{status.get('hops_total')}",
        f"poller {'up' if poller.get('alive') else 'DOWN'}  rounds {poller.get('rounds')}  "
        f"missing replies {poller.get('replies_missing')}  counter resets {poller.get('counter_resets')}  "
        f"reply p50 {_fmt(poller.get('reply_latency_ms_p50'), '.1f')} ms",
    ]
    header = (f"{'LINK':<16} {'LOAD Gb/s':>10} {'CAP Gb/s':>9} {'UTIL%':>6} {'EMUL Mb/s':>10} "
              f"{'DROPS':>6} {'QUEUE B':>8} {'QDROPS':>7} {'AGE ms':>7}")
    by_tier: dict[str, list[dict[str, Any]]] = links.get("by_tier", {})
    for tier in sorted(by_tier, key=int, reverse=True):
        rows = by_tier[tier]
        if not rows:
            continue
        name = TIER_NAMES.get(int(tier), f"tier {tier}")
        busy = sum(1 for r in rows if r["utilization"] >= 0.01)
        lines.append("")
        lines.append(f"tier {tier} - {name}: {len(rows)} directed links, {busy} carrying >= 1% of capacity")
        lines.append(header)
        shown = rows if limit <= 0 else rows[:limit]
        for r in shown:
            q = r.get("queue") or {}
            lines.append(
                f"{r['src'] + '>' + r['dst']:<16} {r['load_gbps']:>10.2f} {r['capacity_gbps']:>9.0f} "
                f"{100 * r['utilization']:>6.1f} {r['rate_bps'] / 1e6:>10.3f} {r.get('drops_total', r['drops']):>6} "
                f"{_fmt(q.get('backlog_bytes'), 'd'):>8} {_fmt(q.get('drops_total'), 'd'):>7} "
                f"{r['age_ms']:>7.0f}")
        if len(shown) < len(rows):
            lines.append(f"  ... {len(rows) - len(shown)} more (use --limit 0)")
    return "\n".join(line[:width] if width > 0 else line for line in lines)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.limit < 0:
        print(f"netkv telemetry: --limit must be >= 0, got {args.limit}", file=sys.stderr)
        return 2
    if args.interval_s is not None and not args.interval_s >= MIN_INTERVAL_S:
        print(f"netkv telemetry: --interval-s must be >= {MIN_INTERVAL_S}, got {args.interval_s}", file=sys.stderr)
        return 2
    if args.json or args.once:
        try:
            snap = snapshot(args.url, args.tier, args.timeout_s)
        except TelemetryFetchError as exc:
            print(f"netkv telemetry: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(snap), file=out)
        else:
            print(render(snap, args.limit, width=0), file=out)
        return 0
    tty = out.isatty()
    try:
        while True:
            interval = args.interval_s
            try:
                snap = snapshot(args.url, args.tier, args.timeout_s)
                text = render(snap, args.limit, width=_columns() if tty else 0)
                if interval is None:
                    interval = max(MIN_INTERVAL_S, float(snap["status"].get("poll_interval_s", 1.0)))
            except TelemetryFetchError as exc:
                text = f"netkv telemetry: {exc} (retrying)"
            interval = interval or 1.0
            out.write((CLEAR if tty else "") + text + "\n" + ("" if tty else "\n"))
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _columns() -> int:
    import shutil

    return shutil.get_terminal_size((120, 40)).columns


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="netkv telemetry", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
