"""The controller's HTTP API, bound to loopback only.

Endpoints (all GET; JSON unless noted; docs/telemetry.md has examples):
  /status                       connections, route installation, poller health
  /topology                     the topology description (nodes, links, tiers, rates)
  /links[?tier=N][&group=tier][&limit=N]
                                latest figures of every directed link, busiest first
  /links/<src>/<dst>[?limit=N]  one directed link's history (ring buffer), oldest first
                                (POST /links/<a>/<b> {"rate_gbps": R}: the operator
                                configured the link a-b at R real Gbit/s)
  /path?src=gA&dst=gB           the path installed for that pair, with per-hop load
  /oracle?src=gA&dst=gB&bytes=N the network cost oracle's estimate for N real bytes:
                                telemetry-based and static
  /metrics                      Prometheus text exposition
  /replay                       the replay a running `netkv run` last reported
                                (POST /replay: the replay driver reports, JSON)
  /openapi.json                 the OpenAPI 3 description of all of this (openapi.py)
  /                             the live fabric view (HTML, fabric.html)
Malformed queries get a 4xx with {"error": "..."}.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from . import metrics, openapi
from .state import ControllerState, hop_rate_json

JSON_TYPE = "application/json"
MAX_LIMIT = 100_000
MAX_ORACLE_BYTES = 1 << 50  # 1 PiB: far above any KV payload
MAX_REPLAY_REPORT_BYTES = 1 << 20
REPLAY_ACTIVE_S = 5.0  # a replay that has not reported for this long is shown as gone
FABRIC_PAGE = Path(__file__).with_name("fabric.html")
REPLAY_KEYS = {"scheduler", "requests_done", "requests_total", "transfers_in_flight", "finished"}
TRANSFER_KEYS = {"src", "dst", "bytes"}


@dataclass(frozen=True)
class Raw:
    """A non-JSON answer: its content type and bytes."""

    content_type: str
    body: bytes


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def require_loopback(host: str) -> None:
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"the API must listen on a loopback address, got {host!r}")


def require_management_address(host: str) -> None:
    """The OpenFlow listener of a testbed on several servers: one unicast
    IPv4 address (the head's management address), never every address."""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"the OpenFlow management address must be one IPv4 address, got {host!r}") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or host == "255.255.255.255":
        raise ValueError(f"the OpenFlow management address must be this machine's unicast address on the "
                         f"management network, got {host!r}")


Handler = Callable[[list[str], dict[str, list[str]]], Any]


class Api:
    """Routes a path and query to an answer; no sockets, easy to test."""

    def __init__(self, state: ControllerState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.clock = clock
        self.routes: dict[str, Handler] = {
            "status": self._status,
            "topology": self._topology,
            "links": self._links,
            "path": self._path,
            "oracle": self._oracle,
            "metrics": self._metrics,
            "replay": self._replay,
            "openapi.json": self._openapi,
            "": self._page,
        }
        self._allowed: dict[str, set[str]] = {
            "status": set(), "topology": set(), "links": {"tier", "group", "limit"},
            "path": {"src", "dst"}, "oracle": {"src", "dst", "bytes"}, "metrics": set(),
            "replay": set(), "openapi.json": set(), "": {"link", "pair", "bytes"},
        }
        self._replay_lock = threading.Lock()
        self._replay_report: dict[str, Any] | None = None
        self._replay_t_s: float | None = None

    def handle(self, raw_path: str) -> tuple[int, Any]:
        """JSON endpoints: (HTTP status, body).  /metrics returns its text as body."""
        url = urlparse(raw_path)
        parts = [p for p in url.path.split("/") if p] or [""]
        try:
            if parts[0] not in self.routes:
                raise ApiError(404, f"unknown endpoint {url.path!r}; known: /{', /'.join(self.routes)}")
            try:
                query = parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query))
            except ValueError:
                raise ApiError(400, f"malformed query string {url.query!r}") from None
            unknown = sorted(set(query) - self._allowed[parts[0]])
            if unknown:
                allowed = ", ".join(sorted(self._allowed[parts[0]])) or "none"
                raise ApiError(400, f"unknown query parameter {unknown[0]!r} for /{parts[0]}; allowed: {allowed}")
            return 200, self.routes[parts[0]](parts[1:], query)
        except ApiError as exc:
            return exc.status, {"error": str(exc)}

    def respond(self, raw_path: str) -> tuple[int, str, bytes]:
        """(HTTP status, content type, body bytes) for the HTTP server."""
        status, body = self.handle(raw_path)
        if isinstance(body, Raw):
            return status, body.content_type, body.body
        if isinstance(body, str):
            return status, metrics.CONTENT_TYPE, body.encode()
        return status, JSON_TYPE, json.dumps(body).encode()

    def respond_post(self, raw_path: str, body: bytes) -> tuple[int, str, bytes]:
        """POST: /replay (the replay driver's progress report) and
        /links/<a>/<b> (a link's configured rate)."""
        path = urlparse(raw_path).path.rstrip("/")
        if not post_allowed(path):
            return 405, JSON_TYPE, json.dumps({"error": f"POST is only for /replay and /links/<a>/<b>, "
                                                        f"not {path or '/'!r}"}).encode()
        try:
            answer = self.report_replay(body) if path == "/replay" else self.configure_link(path, body)
        except ApiError as exc:
            return exc.status, JSON_TYPE, json.dumps({"error": str(exc)}).encode()
        return 200, JSON_TYPE, json.dumps(answer).encode()

    # -- a link's configured rate ------------------------------------------------
    def configure_link(self, path: str, body: bytes) -> dict[str, Any]:
        """Store a link's configured rate (schema LinkRate in openapi.py): what
        the operator set it to, e.g. after a re-rate; the topology's rate
        again ends the change.  Utilisation, /path and /oracle use it."""
        a, b = path.strip("/").split("/")[1:]
        link = self._link(a, b, f"no link between {a!r} and {b!r}")
        try:
            config = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "link rate is not JSON") from None
        if not isinstance(config, dict) or set(config) != {"rate_gbps"}:
            raise ApiError(400, f"link rate must be {{\"rate_gbps\": number}}, got {str(config)[:200]}")
        try:
            before = self.state.set_capacity(a, b, config["rate_gbps"])
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return {"link": list(link.key), "rate_gbps": self.state.capacity_gbps(a, b), "previous_gbps": before,
                "topology_gbps": link.rate_gbps}

    # -- the replay's progress ---------------------------------------------------
    def report_replay(self, body: bytes) -> dict[str, Any]:
        """Check and store a replay driver's report (schema ReplayReport in openapi.py)."""
        if len(body) > MAX_REPLAY_REPORT_BYTES:
            raise ApiError(413, f"replay report of {len(body)} bytes; at most {MAX_REPLAY_REPORT_BYTES}")
        try:
            report = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "replay report is not JSON") from None
        if not isinstance(report, dict):
            raise ApiError(400, "replay report must be a JSON object")
        unknown = sorted(set(report) - REPLAY_KEYS)
        missing = sorted(REPLAY_KEYS - {"finished"} - set(report))
        if unknown or missing:
            raise ApiError(400, f"replay report: unknown keys {unknown}, missing keys {missing}; "
                                f"known: {sorted(REPLAY_KEYS)}")
        if not isinstance(report["scheduler"], str):
            raise ApiError(400, "replay report: scheduler must be a string")
        for key in ("requests_done", "requests_total"):
            if not _whole(report[key]):
                raise ApiError(400, f"replay report: {key} must be a whole number >= 0, got {report[key]!r}")
            report[key] = int(report[key])
        if not isinstance(report.get("finished", False), bool):
            raise ApiError(400, "replay report: finished must be true or false")
        transfers = report["transfers_in_flight"]
        if not isinstance(transfers, list) or len(transfers) > 10_000:
            raise ApiError(400, "replay report: transfers_in_flight must be a list of at most 10000 transfers")
        for t in transfers:
            if not (isinstance(t, dict) and set(t) <= TRANSFER_KEYS and {"src", "dst"} <= set(t)
                    and all(isinstance(t[k], str) for k in ("src", "dst"))
                    and ("bytes" not in t or _whole(t["bytes"]))):
                raise ApiError(400, f"replay report: a transfer must be {{src, dst[, bytes]}}, got {t!r}")
            if "bytes" in t:
                t["bytes"] = int(t["bytes"])
            for name in (t["src"], t["dst"]):
                node = self.state.topo.nodes.get(name)
                if node is None or not node.is_gpu:
                    raise ApiError(400, f"replay report: unknown GPU host {name!r} in a transfer")
        with self._replay_lock:
            self._replay_report = report
            self._replay_t_s = self.clock()
        return self._replay([], {})

    # -- argument parsing ---------------------------------------------------------
    def _link(self, a: str, b: str, missing: str) -> Any:
        """The topology's link between the nodes a and b; 404 for an unknown
        node, or with ``missing`` when they share no link."""
        for name in (a, b):
            if name not in self.state.topo.nodes:
                raise ApiError(404, f"unknown node {name!r}")
        try:
            return self.state.topo.link_between(a, b)
        except KeyError:
            raise ApiError(404, missing) from None

    def _gpu(self, name: str) -> str:
        node = self.state.topo.nodes.get(name)
        if node is None or not node.is_gpu:
            gpus = self.state.topo.gpu_names()
            raise ApiError(404, f"unknown GPU host {name!r}; known: {gpus[0]}..{gpus[-1]}")
        return name

    @staticmethod
    def _one(query: dict[str, list[str]], key: str) -> str:
        values = query.get(key)
        if not values or len(values) != 1 or not values[0]:
            raise ApiError(400, f"query parameter {key!r} is required exactly once")
        return values[0]

    @classmethod
    def _int(cls, query: dict[str, list[str]], key: str, lo: int, hi: int) -> int:
        raw = cls._one(query, key)
        text = raw.strip()
        if not text.isdigit() and not (text.startswith("-") and text[1:].isdigit()):
            raise ApiError(400, f"{key} must be a whole number in {lo}..{hi}, got {raw!r}")
        value = int(text)
        if not lo <= value <= hi:
            raise ApiError(400, f"{key} must be in {lo}..{hi}, got {value}")
        return value

    def _pair(self, query: dict[str, list[str]]) -> tuple[str, str]:
        src = self._gpu(self._one(query, "src"))
        dst = self._gpu(self._one(query, "dst"))
        if src == dst:
            raise ApiError(400, f"src and dst are the same host {src!r}")
        return src, dst

    # -- endpoints -------------------------------------------------------------------
    def _status(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("status", rest)
        return self.state.status(self.clock())

    @staticmethod
    def _no_rest(name: str, rest: list[str]) -> None:
        if rest:
            raise ApiError(404, f"/{name} has no sub-resources, got /{name}/{'/'.join(rest)}")

    def _topology(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("topology", rest)
        topo = self.state.topo
        return {
            **topo.summary(),
            "nodes": [{"name": n.name, "kind": n.kind, "tier": n.tier,
                       **({"ip": topo.ip_of(n.name)} if n.is_gpu else {"dpid": n.dpid})}
                      for n in topo.nodes.values()],
            "links": [{"a": l.a, "b": l.b, "a_port": l.a_port, "b_port": l.b_port,
                       "tier": l.tier, "rate_gbps": l.rate_gbps} for l in topo.links],
        }

    def _links(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        now = self.clock()
        if not rest:
            tiers = sorted({l.tier for l in self.state.topo.links})
            rows = self.state.links_json(now)
            if "tier" in query:
                tier = self._int(query, "tier", min(tiers), max(tiers))
                if tier not in tiers:
                    raise ApiError(400, f"tier must be one of {tiers}, got {tier}")
                rows = [r for r in rows if r["tier"] == tier]
            if "limit" in query:
                rows = rows[: self._int(query, "limit", 1, MAX_LIMIT)]
            body: dict[str, Any] = {"t_s": now, "scale": self.state.scale,
                                    "poll_interval_s": self.state.poll_interval_s,
                                    "units": {"load_gbps": "real-world Gbit/s", "rate_bps": "emulated bit/s",
                                              "utilization": "load / configured rate"},
                                    "links": rows}
            if "group" in query:
                group = self._one(query, "group")
                if group != "tier":
                    raise ApiError(400, f"group must be 'tier', got {group!r}")
                grouped: dict[str, list[dict[str, object]]] = {str(t): [] for t in tiers}
                for row in rows:
                    grouped[str(row["tier"])].append(row)
                body["by_tier"] = grouped
            return body
        if len(rest) != 2:
            raise ApiError(404, "use /links or /links/<src>/<dst>")
        src, dst = rest
        link = self._link(src, dst, f"no link from {src!r} to {dst!r}")
        history = self.state.history(src, dst)
        if "limit" in query:
            history = history[-self._int(query, "limit", 1, MAX_LIMIT):]
        return {"src": src, "dst": dst, "tier": link.tier, "capacity_gbps": self.state.capacity_gbps(src, dst),
                "interface": self.state.egress_interface(src, dst),
                "history_len": self.state.history_len,
                "history": [hop_rate_json(r) for r in history]}

    def _path(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("path", rest)
        src, dst = self._pair(query)
        topo = self.state.topo
        now = self.clock()
        latest = {(r.src, r.dst): r for r in self.state.latest()}
        try:  # the routes installed now (they differ from topo.path while a link is down)
            nodes = self.state.installed_path(src, dst)
        except LookupError:
            nodes = topo.path(src, dst)
        hops = []
        for x, y in zip(nodes, nodes[1:]):
            link = topo.link_between(x, y)
            r = latest.get((x, y))
            hops.append({"src": x, "dst": y, "tier": link.tier, "capacity_gbps": self.state.capacity_gbps(x, y),
                         "interface": self.state.egress_interface(x, y),
                         "load_gbps": None if r is None else r.load_gbps,
                         "utilization": None if r is None else r.utilization,
                         "age_ms": None if r is None else round((now - r.t_s) * 1000, 3)})
        links = [topo.link_between(x, y) for x, y in zip(nodes, nodes[1:])]
        return {"src": src, "dst": dst, "src_ip": topo.ip_of(src), "dst_ip": topo.ip_of(dst),
                "nodes": nodes,
                "alternatives": [p for p in topo.shortest_paths(src, dst) if p != nodes],
                "tier_distance": max(l.tier for l in links),
                "bottleneck_gbps": min(self.state.capacity_gbps(x, y) for x, y in zip(nodes, nodes[1:])),
                "hops": hops,
                "links_down": [list(k) for k in sorted(self.state.links_down)
                               if any(link.key == k for link in links)]}

    def _oracle(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("oracle", rest)
        src, dst = self._pair(query)
        size = self._int(query, "bytes", 0, MAX_ORACLE_BYTES)
        from netkv.oracle import StaticOracle, TelemetryOracle

        now = self.clock()
        snapshot = self.telemetry_snapshot()
        # Four polls of age are still live telemetry, whatever the interval.
        max_age_ms = max(2000.0, 4000.0 * self.state.poll_interval_s)
        live = TelemetryOracle(self.state.topo, lambda: snapshot, max_age_ms=max_age_ms)
        static = StaticOracle(self.state.topo)
        # what the controller knows of the fabric now: links out of service
        # (port-status) and links the operator re-rated
        for oracle in (live, static):
            for key in sorted(self.state.links_down):
                oracle.set_link(*key, up=False)
            for key, rate_gbps in sorted(self.state.capacity_overrides_gbps.items()):
                oracle.set_link(*key, rate_gbps=rate_gbps)
        return {"src": src, "dst": dst, "bytes": size, "units": {"bytes": "real-world bytes",
                                                                  "transfer_ms": "real-world ms"},
                "scale": self.state.scale, "max_age_ms": max_age_ms,
                "telemetry": asdict(live.estimate(src, dst, size, now)),
                "static": asdict(static.estimate(src, dst, size, now))}

    def telemetry_snapshot(self) -> Any:
        """The controller's latest samples as a :class:`netkv.telemetry.TelemetrySnapshot`."""
        from netkv.telemetry import LinkSample, TelemetrySnapshot

        return TelemetrySnapshot.of(
            LinkSample(r.src, r.dst, r.t_s, max(0.0, r.load_gbps), r.capacity_gbps, r.utilization,
                       r.drops, r.errors)
            for r in self.state.latest())

    def _metrics(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("metrics", rest)
        return metrics.render(self.state, self.clock())

    def _replay(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("replay", rest)
        with self._replay_lock:
            report, t_s = self._replay_report, self._replay_t_s
        age_s = None if t_s is None else max(0.0, self.clock() - t_s)
        active = (report is not None and age_s is not None and age_s <= REPLAY_ACTIVE_S
                  and not report.get("finished", False))
        return {"active": active, "age_s": age_s, "report": report}

    def _openapi(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        self._no_rest("openapi.json", rest)
        return openapi.document(self.state.topo.gpu_names(), sorted({l.tier for l in self.state.topo.links}))

    def _page(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        # the page reads its parameters itself; checked here so that a bad link says so
        if "link" in query:
            src, _, dst = self._one(query, "link").partition(">")
            try:
                known = src in self.state.topo.nodes and dst in self.state.topo.nodes \
                    and self.state.topo.link_between(src, dst) is not None
            except KeyError:
                known = False
            if not known:
                raise ApiError(400, f"link must be SRC>DST of a directed link, e.g. t0>a1, got {query['link'][0]!r}")
        if "pair" in query:
            src, _, dst = self._one(query, "pair").partition(">")
            self._pair({"src": [src], "dst": [dst]})
        if "bytes" in query:
            self._int(query, "bytes", 0, MAX_ORACLE_BYTES)
        return Raw("text/html; charset=utf-8", FABRIC_PAGE.read_bytes())


def _whole(value: object) -> bool:
    """A whole number >= 0; JSON's 736.0 is one too (JSON Schema's integer)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def post_allowed(path: str) -> bool:
    """The routes that take a POST: /replay and /links/<a>/<b>."""
    parts = path.strip("/").split("/")
    return path == "/replay" or (len(parts) == 3 and parts[0] == "links" and all(parts[1:]))


def serve(state: ControllerState, host: str, port: int) -> ThreadingHTTPServer:
    """Start the API in a daemon thread; returns the server (call shutdown())."""
    require_loopback(host)
    api = Api(state)

    class RequestHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            try:
                status, ctype, data = api.respond(self.path)
            except Exception as exc:  # noqa: BLE001 - answer, never drop the connection
                status, ctype = 500, JSON_TYPE
                data = json.dumps({"error": f"internal error: {exc!r}"}).encode()
            self._send(status, ctype, data)

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            if not post_allowed(urlparse(self.path).path.rstrip("/")):
                self._refuse()
                return
            try:
                length = int(self.headers.get("Content-Length") or "0")
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_REPLAY_REPORT_BYTES:
                self._send(413 if length > 0 else 400, JSON_TYPE, json.dumps(
                    {"error": f"Content-Length must be 0..{MAX_REPLAY_REPORT_BYTES}"}).encode())
                self.close_connection = True
                return
            try:
                status, ctype, data = api.respond_post(self.path, self.rfile.read(length))
            except Exception as exc:  # noqa: BLE001 - answer, never drop the connection
                status, ctype = 500, JSON_TYPE
                data = json.dumps({"error": f"internal error: {exc!r}"}).encode()
            self._send(status, ctype, data)

        def _refuse(self) -> None:
            allow = "GET, POST" if post_allowed(urlparse(self.path).path.rstrip("/")) else "GET"
            data = json.dumps({"error": f"method {self.command} not allowed; use {allow}"}).encode()
            self.send_response(405)
            self.send_header("Allow", allow)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = _refuse  # noqa: N815

        def __getattr__(self, name: str) -> Any:
            # any other method (http.server would answer 501, a server error): 405 too
            if name.startswith("do_"):
                return self._refuse
            raise AttributeError(name)

        def _send(self, status: int, ctype: str, data: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer((host, port), RequestHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="netkv-rest", daemon=True).start()
    return server
