"""The controller's HTTP/JSON API, bound to loopback only.

Endpoints (all GET, JSON):
  /status                     connection and route-installation progress
  /topology                   the topology description (nodes, links, tiers, rates)
  /links                      latest figures of every directed link, busiest first
  /links/<src>/<dst>          one directed link's history (ring buffer)
  /path?src=gA&dst=gB         the path the controller installed for that pair
Malformed queries get a 4xx with {"error": "..."}.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

from .state import ControllerState


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


class Api:
    """Routes a path and query to a JSON answer; no sockets, easy to test."""

    def __init__(self, state: ControllerState) -> None:
        self.state = state
        self.routes: dict[str, Callable[[list[str], dict[str, list[str]]], Any]] = {
            "status": self._status,
            "topology": self._topology,
            "links": self._links,
            "path": self._path,
        }

    def handle(self, raw_path: str) -> tuple[int, Any]:
        url = urlparse(raw_path)
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts or parts[0] not in self.routes:
                raise ApiError(404, f"unknown endpoint {url.path!r}; known: /{', /'.join(self.routes)}")
            return 200, self.routes[parts[0]](parts[1:], parse_qs(url.query))
        except ApiError as exc:
            return exc.status, {"error": str(exc)}

    def _gpu(self, name: str) -> str:
        node = self.state.topo.nodes.get(name)
        if node is None or not node.is_gpu:
            raise ApiError(404, f"unknown GPU host {name!r}")
        return name

    @staticmethod
    def _one(query: dict[str, list[str]], key: str) -> str:
        values = query.get(key)
        if not values or len(values) != 1 or not values[0]:
            raise ApiError(400, f"query parameter {key!r} is required exactly once")
        return values[0]

    def _status(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        return self.state.status()

    def _topology(self, rest: list[str], query: dict[str, list[str]]) -> Any:
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
        now = time.time()
        if not rest:
            return {"t_s": now, "scale": self.state.scale, "links": self.state.links_json(now)}
        if len(rest) != 2:
            raise ApiError(404, "use /links or /links/<src>/<dst>")
        src, dst = rest
        try:
            self.state.topo.link_between(src, dst)
        except KeyError:
            raise ApiError(404, f"no link from {src!r} to {dst!r}") from None
        return {"src": src, "dst": dst,
                "history": [r.__dict__ for r in self.state.history(src, dst)]}

    def _path(self, rest: list[str], query: dict[str, list[str]]) -> Any:
        src = self._gpu(self._one(query, "src"))
        dst = self._gpu(self._one(query, "dst"))
        if src == dst:
            raise ApiError(400, "src and dst are the same host")
        topo = self.state.topo
        return {"src": src, "dst": dst, "nodes": topo.path(src, dst),
                "tier_distance": topo.tier_distance(src, dst),
                "bottleneck_gbps": topo.bottleneck_gbps(src, dst)}


def serve(state: ControllerState, host: str, port: int) -> ThreadingHTTPServer:
    """Start the API in a daemon thread; returns the server (call shutdown())."""
    require_loopback(host)
    api = Api(state)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            status, body = api.handle(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="netkv-rest", daemon=True).start()
    return server
