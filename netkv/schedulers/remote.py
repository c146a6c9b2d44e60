"""Decisions from another process: the decision protocol, its client and a
reference server.

A scheduler in another process (another language, a learned model behind a
server) decides over HTTP/JSON on a Unix socket or on loopback.  The testbed
names it ``remote+unix:///path/to.sock`` or ``remote+http://127.0.0.1:PORT``
wherever a scheduler name goes (``netkv run --schedulers``).  Per request it
POSTs ``/decide`` with what an in-process scheduler sees (:data:`OPENAPI`):

* the request (id, arrival, lengths, prefix block hashes) and its prefill;
* every candidate decode: queue and batch, KV memory, how many of the
  request's leading blocks it already holds, and the oracle's price of a
  transfer from the prefill to it as a linear model (tier, base latency, ms
  per byte), so the scheduler can price any payload;
* ``deadline_ms``.

It answers ``{"decode": NAME}`` (optionally ``tokens_to_send`` and
``score_terms``), or ``{"decode": null, "no_eligible": WHY}`` when no
candidate can take the request (the request fails with that reason, as with
an in-process scheduler).  The round trip is inside the decision's timing, so an
out-of-process scheduler pays for it in the records.  An answer later than
the deadline, an error, or nonsense (a decode it was not offered or that
cannot admit the request, a field of the wrong type) is a :class:`SchedulerFault`: that request fails with the
reason, the replay goes on, and the records say which requests it affected.

:func:`serve` runs any in-process :class:`Scheduler` behind the protocol
(``python -m netkv.schedulers.remote --scheduler netkv --unix PATH``): its
decisions equal the in-process ones, which tests/unit/test_decision_protocol.py
checks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import socket
import socketserver
import sys
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, ClassVar, Mapping, Sequence

from ..oracle import Estimate, Oracle
from ..oracle.paths import TransferModel, TransferTable
from ..request import BLOCK_TOKENS, DecodeView, Request, matched_prefix_blocks
from .base import Decision, NoEligibleDecode, Param, Scheduler, SchedulerLoadError

PROTOCOL_VERSION = 1
PREFIX = "remote+"
DEADLINE_GRACE_S = 1.0  # how long past its deadline a connection is waited on before it is given up

_CANDIDATE_FIELDS = {"name": "string", "queue_len": "integer", "active_batch": "integer", "max_batch": "integer",
                     "max_queue": "integer", "free_kv_tokens": "integer", "used_kv_tokens": "integer",
                     "matched_blocks": "integer", "tier": "integer", "base_latency_ms": "number",
                     "ms_per_byte": "number"}
OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "NetKV decision protocol", "version": str(PROTOCOL_VERSION),
             "description": "One decode decision per request, asked by the testbed of a scheduler in another "
                            "process (netkv/schedulers/remote.py)."},
    "paths": {"/decide": {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/DecideRequest"}}}},
        "responses": {
            "200": {"description": "the decision", "content": {"application/json": {"schema": {
                "$ref": "#/components/schemas/DecideAnswer"}}}},
            "400": {"description": "a malformed question"}}}}},
    "components": {"schemas": {
        "DecideRequest": {"type": "object", "required": ["protocol", "deadline_ms", "now_s", "prefill", "request",
                                                         "kv_bytes_per_token", "candidates"],
                          "properties": {
                              "protocol": {"type": "integer", "enum": [PROTOCOL_VERSION]},
                              "deadline_ms": {"type": "number", "description": "answer within this, from the "
                                                                               "testbed's sending the question"},
                              "now_s": {"type": "number", "description": "epoch seconds of the decision"},
                              "prefill": {"type": "string", "description": "the prefill instance chosen"},
                              "kv_bytes_per_token": {"type": "integer"},
                              "request": {"type": "object", "required": ["id", "arrival_ms", "input_tokens",
                                                                         "output_tokens", "hash_ids"],
                                          "properties": {"id": {"type": "string"}, "arrival_ms": {"type": "number"},
                                                         "input_tokens": {"type": "integer"},
                                                         "output_tokens": {"type": "integer"},
                                                         "hash_ids": {"type": "array",
                                                                      "items": {"type": "integer"}}}},
                              "candidates": {"type": "array", "items": {
                                  "type": "object", "required": sorted(_CANDIDATE_FIELDS),
                                  "properties": {k: {"type": v} for k, v in _CANDIDATE_FIELDS.items()}}}}},
        "DecideAnswer": {"type": "object", "required": ["decode"], "properties": {
            "decode": {"type": ["string", "null"], "description": "one of the candidates' names that can admit "
                                                                 "the request; null with no_eligible"},
            "no_eligible": {"type": "string", "description": "why no candidate can take the request (decode "
                                                             "null): the request fails with this reason"},
            "tokens_to_send": {"type": "integer", "description": "default: the input tokens beyond the "
                                                                 "decode's matched blocks"},
            "score_terms": {"type": "object", "additionalProperties": {"type": "number"}}}}}},
}


class SchedulerFault(Exception):
    """An out-of-process scheduler missed its deadline or answered nonsense:
    the request fails with this reason, the replay goes on."""


# -- the question ---------------------------------------------------------------------
def question(request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle, now_s: float,
             kv_bytes_per_token: int, deadline_ms: float) -> dict[str, Any]:
    """What the testbed asks: the request, its prefill and every candidate with
    the oracle's price as a linear model."""
    model = getattr(oracle, "transfer_model", None)
    candidates = []
    for d in decodes:
        if model is not None:
            tier, base_ms, ms_per_byte = model(prefill, d.name, now_s)
        else:  # any oracle: two estimates give the line
            zero = oracle.estimate(prefill, d.name, 0, now_s)
            one = oracle.estimate(prefill, d.name, 1 << 20, now_s)
            tier, base_ms, ms_per_byte = zero.tier, zero.transfer_ms, (one.transfer_ms - zero.transfer_ms) / (1 << 20)
        candidates.append({"name": d.name, "queue_len": d.queue_len, "active_batch": d.active_batch,
                           "max_batch": d.max_batch, "max_queue": d.max_queue, "free_kv_tokens": d.free_kv_tokens,
                           "used_kv_tokens": d.used_kv_tokens,
                           "matched_blocks": matched_prefix_blocks(request.hash_ids, d.cached_blocks),
                           "tier": int(tier), "base_latency_ms": float(base_ms), "ms_per_byte": float(ms_per_byte)})
    return {"protocol": PROTOCOL_VERSION, "deadline_ms": deadline_ms, "now_s": now_s, "prefill": prefill,
            "kv_bytes_per_token": kv_bytes_per_token,
            "request": {"id": request.request_id, "arrival_ms": request.arrival_ms,
                        "input_tokens": request.input_tokens, "output_tokens": request.output_tokens,
                        "hash_ids": list(request.hash_ids)},
            "candidates": candidates}


class _TableOracle:
    """The oracle a question carries: each candidate's linear price."""

    def __init__(self, prefill: str, rows: Mapping[str, TransferModel], now_s: float) -> None:
        self.prefill = prefill
        self.rows = dict(rows)
        self.table = TransferTable(lambda dst: self.rows[dst], now_s)
        self.table.update(self.rows)

    def tier(self, src: str, dst: str) -> int:
        return self.rows[dst][0]

    def transfer_model(self, src: str, dst: str, now_s: float) -> TransferModel:
        return self.rows[dst]

    def transfer_table(self, src: str, now_s: float) -> TransferTable:
        return self.table

    def estimate(self, src: str, dst: str, size_bytes: int, now_s: float) -> Estimate:
        tier, base_ms, ms_per_byte = self.rows[dst]
        gbps = 8.0 / (ms_per_byte * 1e6) if ms_per_byte > 0 else math.inf
        return Estimate(base_ms + size_bytes * ms_per_byte, gbps, base_ms, tier, 0, None, "remote")


def decide(scheduler: Scheduler, body: Mapping[str, Any]) -> dict[str, Any]:
    """Answer one question with an in-process scheduler (the reference server's
    work): the views and the oracle are rebuilt from what the question says."""
    if body.get("protocol") != PROTOCOL_VERSION:
        raise ValueError(f"protocol must be {PROTOCOL_VERSION}, got {body.get('protocol')!r}")
    r = body["request"]
    req = Request(str(r["id"]), float(r["arrival_ms"]), int(r["input_tokens"]), int(r["output_tokens"]),
                  tuple(int(h) for h in r["hash_ids"]))
    views, rows = [], {}
    for c in body["candidates"]:
        views.append(DecodeView(str(c["name"]), int(c["queue_len"]), int(c["active_batch"]), int(c["max_batch"]),
                                int(c["free_kv_tokens"]), frozenset(req.hash_ids[:int(c["matched_blocks"])]),
                                int(c["max_queue"]), used_kv_tokens=int(c["used_kv_tokens"])))
        rows[str(c["name"])] = (int(c["tier"]), float(c["base_latency_ms"]), float(c["ms_per_byte"]))
    now_s = float(body["now_s"])
    try:
        decision = scheduler.choose(req, str(body["prefill"]), views,
                                    _TableOracle(str(body["prefill"]), rows, now_s), now_s)
    except NoEligibleDecode as exc:
        return {"decode": None, "no_eligible": str(exc)}
    return {"decode": decision.decode, "tokens_to_send": int(decision.tokens_to_send),
            "score_terms": {k: float(v) for k, v in decision.score_terms.items()}}


# -- the client ------------------------------------------------------------------------
class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _connection(endpoint: str, timeout_s: float) -> http.client.HTTPConnection:
    if endpoint.startswith("unix://"):
        return _UnixConnection(endpoint[len("unix://"):], timeout_s)
    if endpoint.startswith("http://"):
        host, _, port = endpoint[len("http://"):].rstrip("/").partition(":")
        if host not in ("127.0.0.1", "localhost", "::1") or not port.isdigit():
            raise SchedulerLoadError(f"remote scheduler {endpoint!r}: only a loopback host:port or a Unix socket")
        return http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    raise SchedulerLoadError(f"remote scheduler {endpoint!r}: give unix:///path or http://127.0.0.1:PORT")


class RemoteScheduler(Scheduler):
    """A scheduler in another process, asked over the decision protocol."""

    name = "remote"
    doc = "a scheduler in another process, asked per request over the decision protocol (HTTP/JSON)"
    params: ClassVar[Mapping[str, Param]] = {
        "deadline_ms": Param(5.0, 0.01, 60_000.0, "an answer later than this fails its request"),
    }
    endpoint: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        self.deadline_ms = self.cfg["deadline_ms"]
        self._conn = _connection(self.endpoint, self.deadline_ms / 1000.0 + DEADLINE_GRACE_S)

    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        body = json.dumps(question(request, prefill, decodes, oracle, now_s, self.kv_bytes_per_token,
                                   self.deadline_ms)).encode()
        started = time.perf_counter()
        try:
            self._conn.request("POST", "/decide", body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise SchedulerFault(f"no answer from {self.endpoint}: {type(exc).__name__}: {exc}") from None
        took_ms = (time.perf_counter() - started) * 1e3
        if took_ms > self.deadline_ms:
            raise SchedulerFault(f"answered in {took_ms:.2f} ms, after its deadline of {self.deadline_ms:g} ms")
        if resp.status != 200:
            raise SchedulerFault(f"answered HTTP {resp.status}: {raw[:200]!r}")
        try:
            answer = json.loads(raw)
            name = answer["decode"]
            terms = {str(k): float(v) for k, v in (answer.get("score_terms") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SchedulerFault(f"answered nonsense: {raw[:200]!r}") from None
        if name is None and isinstance(answer.get("no_eligible"), str):
            raise NoEligibleDecode(answer["no_eligible"])  # as an in-process scheduler says it
        view = next((d for d in decodes if d.name == name), None)
        if view is None:
            raise SchedulerFault(f"answered decode {name!r}, which it was not offered")
        if not view.eligible(request):
            raise SchedulerFault(f"answered decode {name!r}, which cannot admit request {request.request_id}")
        matched = matched_prefix_blocks(request.hash_ids, view.cached_blocks)
        tokens = answer.get("tokens_to_send", max(0, request.input_tokens - matched * BLOCK_TOKENS))
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= request.input_tokens:
            raise SchedulerFault(f"answered tokens_to_send {tokens!r}; a whole number in [0, {request.input_tokens}]")
        return Decision(name, {**terms, "round_trip_ms": took_ms}, tokens, tokens * self.kv_bytes_per_token, None)


_BOUND: dict[str, type[RemoteScheduler]] = {}


def remote_class(name: str) -> type[RemoteScheduler]:
    """The scheduler class of ``remote+<endpoint>``, one per endpoint."""
    endpoint = name[len(PREFIX):]
    _connection(endpoint, 1.0)  # refuses a bad endpoint in one line
    if name not in _BOUND:
        _BOUND[name] = type("RemoteScheduler", (RemoteScheduler,), {"endpoint": endpoint, "name": name})
    return _BOUND[name]


# -- the reference server -------------------------------------------------------------------
Answer = Callable[[Scheduler, Mapping[str, Any]], dict[str, Any]]


def _handler(scheduler: Scheduler, answer: Answer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - the http.server name
            if self.path != "/decide":
                return self._send(404, {"error": f"unknown path {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                decision = answer(scheduler, body)
            except (ValueError, KeyError, TypeError) as exc:
                return self._send(400, {"error": f"{type(exc).__name__}: {exc}"})
            self._send(200, decision)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the http.server name
            return

    return Handler


class UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = super().get_request()
        return conn, ("local", 0)


def serve(scheduler: Scheduler, unix_path: str, answer: Answer = decide) -> UnixHTTPServer:
    """A server answering the protocol on a Unix socket with ``scheduler``
    (``answer``: how a question is answered; :func:`decide` by default), for
    ``serve_forever``; ``shutdown`` ends it."""
    return UnixHTTPServer(unix_path, _handler(scheduler, answer))


def main(argv: list[str] | None = None) -> int:
    from . import create

    ap = argparse.ArgumentParser(prog="python -m netkv.schedulers.remote",
                                 description="The reference server of the decision protocol: any scheduler the "
                                             "testbed knows, answering over a Unix socket.")
    ap.add_argument("--scheduler", help="scheduler name (built-in, package.module:Class or entry point)")
    ap.add_argument("--config", default="{}", help="its configuration, a JSON object")
    ap.add_argument("--kv-bytes-per-token", type=int, default=131_072)
    ap.add_argument("--unix", help="the socket's path")
    ap.add_argument("--openapi", action="store_true", help="print the protocol's OpenAPI document and exit")
    args = ap.parse_args(argv)
    if args.openapi:
        print(json.dumps(OPENAPI, indent=2))
        return 0
    if not args.scheduler or not args.unix:
        ap.error("--scheduler and --unix are needed")
    try:
        sched = create(args.scheduler, json.loads(args.config), kv_bytes_per_token=args.kv_bytes_per_token)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    server = serve(sched, args.unix)
    print(f"decision server: {args.scheduler} on unix://{args.unix}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
