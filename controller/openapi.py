"""The OpenAPI 3 description of the controller's HTTP API, served at /openapi.json.

This module is the one place that describes every route, its parameters and
the schema of its answers; tests/integration/test_openapi.py checks the real
answers of a running testbed against it, and that the routes the server
answers are exactly the routes listed here.
"""

from __future__ import annotations

from typing import Any

OPENAPI_VERSION = "3.1.0"


def _obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = False) -> dict[str, Any]:
    """An object schema; every listed property is required unless ``required`` says otherwise."""
    return {"type": "object", "properties": props,
            "required": sorted(props) if required is None else required,
            "additionalProperties": extra}


NUM = {"type": "number"}
INT = {"type": "integer"}
STR = {"type": "string"}
BOOL = {"type": "boolean"}
NUM_OR_NULL = {"type": ["number", "null"]}
STR_OR_NULL = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


HOP_RATE = _obj({
    "src": STR, "dst": STR, "tier": INT, "t_s": NUM, "interval_s": NUM,
    "rate_bps": {**NUM, "description": "emulated bit/s"},
    "rate_mbps": {**NUM, "description": "emulated Mbit/s"},
    "load_gbps": {**NUM, "description": "real-world Gbit/s (rate_bps * scale / 1e9)"},
    "capacity_gbps": {**NUM, "description": "real-world configured rate"},
    "utilization": {**NUM, "description": "load_gbps / capacity_gbps"},
    "packets": INT, "drops": INT, "errors": INT,
    "port": {**STR, "description": "where it was measured, e.g. 't1:3 rx'"},
    "clock": {"type": "string", "enum": ["switch", "controller"]},
    "controller_interval_s": NUM,
})

QUEUE = _obj({"interface": STR, "kind": STR, "backlog_bytes": INT, "backlog_packets": INT,
              "drops_total": INT, "overlimits_total": INT, "age_ms": NUM})

LINK_ROW = {"allOf": [{**HOP_RATE, "additionalProperties": True}, _obj({
    "age_ms": NUM, "drops_total": INT, "errors_total": INT,
    "queue": {"anyOf": [_ref("Queue"), {"type": "null"}]},
}, extra=True)]}

ESTIMATE = _obj({"transfer_ms": NUM, "available_gbps": NUM, "base_latency_ms": NUM, "tier": INT, "hops": INT,
                 "telemetry_age_ms": NUM_OR_NULL,
                 "source": {"type": "string", "enum": ["telemetry", "static", "static-fallback"]},
                 "reason": STR})

ERROR = _obj({"error": STR})

TRANSFER = _obj({"src": STR, "dst": STR, "bytes": {**INT, "minimum": 0,
                                                   "description": "real-world KV bytes"}},
                required=["src", "dst"])

REPLAY_REPORT = _obj({
    "scheduler": STR,
    "requests_done": {**INT, "minimum": 0},
    "requests_total": {**INT, "minimum": 0},
    "transfers_in_flight": {"type": "array", "items": _ref("Transfer"), "maxItems": 10_000,
                            "description": "P-to-D KV transfers in flight at any moment since the previous "
                                           "report (under way now, or ended in between)"},
    "finished": BOOL,
}, required=["scheduler", "requests_done", "requests_total", "transfers_in_flight"])

REPLAY = _obj({
    "active": {**BOOL, "description": "a replay reported within the last 5 s and did not say it finished"},
    "age_s": NUM_OR_NULL,
    "report": {"anyOf": [_ref("ReplayReport"), {"type": "null"}]},
})

STATUS = _obj({
    "topology": STR, "switches_expected": INT, "switches_connected": INT, "switches_ready": INT,
    "ready": BOOL, "flow_entries": INT, "poll_interval_s": NUM, "polls_sent": INT, "scale": NUM,
    "prefix": STR_OR_NULL, "history_len": INT, "hops_measured": INT, "hops_total": INT,
    "poller": _obj({
        "alive": BOOL, "started": BOOL, "stalled": BOOL, "died_s": NUM_OR_NULL, "last_round_age_s": NUM_OR_NULL,
        "rounds": INT, "round_failures": INT, "replies_received": INT, "replies_missing": INT,
        "replies_late": INT, "missing_by_switch": {"type": "object", "additionalProperties": INT},
        "reply_latency_ms_p50": NUM_OR_NULL, "reply_latency_ms_p95": NUM_OR_NULL, "counter_resets": INT,
        "last_error": STR_OR_NULL}),
    "queues": _obj({"rounds": INT, "errors": INT, "interfaces": INT, "last_error": STR_OR_NULL}),
    "links_down": {"type": "array", "items": _ref("LinkKey"),
                   "description": "links out of service: a switch end reported its port down"},
    "switches_down": {"type": "array", "items": STR,
                      "description": "switches whose connection ended while this controller ran"},
    "routes_version": {**INT, "description": "how many times the routes were computed again (port-status, switch lost or back)"},
    "reroutes": {"type": "array", "description": "recent route changes after port-status, oldest first", "items": _obj({
        "t_s": {**NUM, "description": "when the port-status reached the controller (wall clock s)"},
        "link": {"anyOf": [_ref("LinkKey"), {"type": "null"}], "description": "the link a port-status named"},
        "switch": {**STR_OR_NULL, "description": "the switch whose connection ended or came back"},
        "up": BOOL, "reported_by": {**STR, "description": "switch:port, or the switch"},
        "links_down": {"type": "array", "items": _ref("LinkKey")},
        "switches": {"type": "array", "items": STR}, "entries_added": INT, "entries_deleted": INT,
        "pending": {"type": "array", "items": STR, "description": "switches that have not confirmed yet"},
        "confirmed_s": {**NUM_OR_NULL, "description": "barrier reply of the last switch (wall clock s)"},
        "confirm_ms": {**NUM_OR_NULL, "description": "from the port-status to the last confirmation"}})},
})
LINK_KEY = {"type": "array", "items": STR, "minItems": 2, "maxItems": 2,
            "description": "a link as [lower node, upper node]"}

_BY_TIER_INT = {"type": "object", "additionalProperties": INT}
TOPOLOGY = _obj({
    "topology": STR, "params": {"type": "object"}, "gpus": INT, "switches": INT, "links": {
        "type": "array", "items": _obj({"a": STR, "b": STR, "a_port": INT, "b_port": INT, "tier": INT,
                                        "rate_gbps": NUM})},
    "switches_by_tier": _BY_TIER_INT, "links_by_tier": _BY_TIER_INT,
    "oversubscription_by_tier": {"type": "object", "additionalProperties": NUM},
    "nodes": {"type": "array", "items": _obj({
        "name": STR, "kind": {"type": "string", "enum": ["gpu", "switch"]},
        "tier": {**INT, "description": "switches 0 (server) .. 3 (core); GPU hosts -1"},
        "ip": STR, "dpid": INT}, required=["name", "kind", "tier"])},
})

LINKS = _obj({
    "t_s": NUM, "scale": NUM, "poll_interval_s": NUM,
    "units": {"type": "object", "additionalProperties": STR},
    "links": {"type": "array", "items": _ref("LinkRow")},
    "by_tier": {"type": "object", "additionalProperties": {"type": "array", "items": _ref("LinkRow")}},
}, required=["t_s", "scale", "poll_interval_s", "units", "links"])

LINK_HISTORY = _obj({"src": STR, "dst": STR, "tier": INT, "capacity_gbps": NUM, "interface": STR_OR_NULL,
                     "history_len": INT, "history": {"type": "array", "items": _ref("HopRate")}})

PATH = _obj({
    "src": STR, "dst": STR, "src_ip": STR, "dst_ip": STR,
    "nodes": {"type": "array", "items": STR},
    "alternatives": {"type": "array", "items": {"type": "array", "items": STR}},
    "tier_distance": INT, "bottleneck_gbps": NUM,
    "hops": {"type": "array", "items": _obj({
        "src": STR, "dst": STR, "tier": INT, "capacity_gbps": NUM, "interface": STR_OR_NULL,
        "load_gbps": NUM_OR_NULL, "utilization": NUM_OR_NULL, "age_ms": NUM_OR_NULL})},
    "links_down": {"type": "array", "items": _ref("LinkKey"),
                   "description": "links of the answered path that are out of service (non-empty only "
                                  "when no equal-cost detour avoids them)"},
})

LINK_RATE = _obj({"rate_gbps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e9,
                               "description": "the link's configured rate, real-world Gbit/s, both directions"}})
LINK_RATE_ANSWER = _obj({"link": _ref("LinkKey"), "rate_gbps": NUM, "previous_gbps": NUM,
                         "topology_gbps": {**NUM, "description": "the topology's rate for this link"}})

ORACLE = _obj({"src": STR, "dst": STR, "bytes": INT, "units": {"type": "object", "additionalProperties": STR},
               "scale": NUM, "max_age_ms": NUM, "telemetry": _ref("Estimate"), "static": _ref("Estimate")})


def _q(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


GPU_PARAM = {"type": "string", "pattern": "^g[0-9]+$"}
LIMIT = _q("limit", {"type": "integer", "minimum": 1, "maximum": 100_000}, "at most this many rows")


def _json_answer(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {"400": _json_answer(_ref("Error"), "malformed query or value out of range"),
          "404": _json_answer(_ref("Error"), "unknown node, link or sub-resource")}


def _get(summary: str, schema: dict[str, Any], params: list[dict[str, Any]] | None = None,
         content_type: str = "application/json") -> dict[str, Any]:
    answer = {"description": summary, "content": {content_type: {"schema": schema}}}
    return {"get": {"summary": summary, "parameters": params or [], "responses": {"200": answer, **ERRORS}}}


def document(gpus: list[str] | None = None, tiers: list[int] | None = None) -> dict[str, Any]:
    """The whole OpenAPI document (a fresh dict each call).  ``gpus`` and ``tiers``:
    the running topology's GPU host names and link tiers, which then become the
    enumerations of the GPU fields and of /links?tier."""
    tier = {"type": "integer", "enum": list(tiers)} if tiers else {"type": "integer", "minimum": 0, "maximum": 3}
    gpu = {"type": "string", "enum": list(gpus)} if gpus else GPU_PARAM
    pair = [_q("src", gpu, "source GPU host, e.g. g0", True),
            _q("dst", gpu, "destination GPU host (not src), e.g. g3", True)]
    transfer = {**TRANSFER, "properties": {**TRANSFER["properties"], "src": gpu, "dst": gpu}}
    paths: dict[str, Any] = {
        "/": _get("the live fabric view (HTML page; reads the JSON routes below)", STR, [
            _q("link", {"type": "string", "pattern": "^[a-z0-9]+>[a-z0-9]+$"},
               "open this directed link's history, e.g. t0>a1"),
            _q("pair", {"type": "string", "pattern": "^g[0-9]+>g[0-9]+$"},
               "show this GPU pair's path and oracle estimate, e.g. g0>g3"),
            _q("bytes", {"type": "integer", "minimum": 0, "maximum": 1 << 50},
               "transfer size for the pair, real-world bytes")],
            content_type="text/html"),
        "/openapi.json": _get("this document", {"type": "object"}),
        "/status": _get("connections, route installation, poller health", _ref("Status")),
        "/topology": _get("the topology description: nodes, links, tiers, rates", _ref("Topology")),
        "/links": _get("latest figures of every directed link, busiest first", _ref("Links"), [
            _q("tier", tier, "only links of this tier"),
            _q("group", {"type": "string", "enum": ["tier"]}, "also group the rows by tier (by_tier)"),
            LIMIT]),
        "/links/{src}/{dst}": _get("one directed link's history (ring buffer), oldest first", _ref("LinkHistory"), [
            {"name": "src", "in": "path", "required": True, "schema": STR, "description": "node the link leaves"},
            {"name": "dst", "in": "path", "required": True, "schema": STR, "description": "node the link enters"},
            LIMIT]),
        "/path": _get("the path installed for a GPU pair, with per-hop load", _ref("Path"), pair),
        "/oracle": _get("the network cost oracle's estimate for a transfer of N real-world bytes", _ref("Oracle"),
                        pair + [_q("bytes", {"type": "integer", "minimum": 0, "maximum": 1 << 50},
                                   "real-world bytes", True)]),
        "/metrics": _get("Prometheus text exposition (format 0.0.4)", STR, content_type="text/plain"),
        "/replay": _get("the replay a running `netkv run` last reported (for the fabric view)", _ref("Replay")),
    }
    paths["/replay"]["post"] = {
        "summary": "a replay driver reports its progress (loopback clients only)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("ReplayReport")}}},
        "responses": {"200": _json_answer(_ref("Replay"), "the report as stored"),
                      "400": _json_answer(_ref("Error"), "malformed report"),
                      "413": _json_answer(_ref("Error"), "report larger than the limit")},
    }
    paths["/links/{src}/{dst}"]["post"] = {
        "summary": "the operator configured the link src-dst (either order) at a new rate; "
                   "the topology's rate ends the change (loopback clients only)",
        "parameters": [p for p in paths["/links/{src}/{dst}"]["get"]["parameters"] if p["in"] == "path"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("LinkRate")}}},
        "responses": {"200": _json_answer(_ref("LinkRateAnswer"), "the link's configured rate now"),
                      "400": _json_answer(_ref("Error"), "malformed body or rate"),
                      "404": _json_answer(_ref("Error"), "unknown node, or no link between them"),
                      "413": _json_answer(_ref("Error"), "body larger than the limit")},
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "NetKV testbed controller", "version": "1",
                 "description": "Telemetry, routes and the network cost oracle of a running NetKV testbed. "
                                "Listens on 127.0.0.1 only. Units are in field names (docs/telemetry.md)."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": {
            "Error": ERROR, "HopRate": HOP_RATE, "Queue": QUEUE, "LinkRow": LINK_ROW, "Estimate": ESTIMATE,
            "Status": STATUS, "LinkKey": LINK_KEY, "Topology": TOPOLOGY, "Links": LINKS, "LinkHistory": LINK_HISTORY, "Path": PATH,
            "Oracle": ORACLE, "LinkRate": LINK_RATE, "LinkRateAnswer": LINK_RATE_ANSWER, "Transfer": transfer, "ReplayReport": REPLAY_REPORT, "Replay": REPLAY,
        }},
    }


def response_schema(path: str, status: str = "200", method: str = "get") -> dict[str, Any]:
    """The JSON schema of one route's answer, with the document's components
    attached so that ``$ref`` resolves (for validators)."""
    doc = document()
    content = doc["paths"][path][method]["responses"][status]["content"]
    schema = next(iter(content.values()))["schema"]
    return {**schema, "components": doc["components"]}
