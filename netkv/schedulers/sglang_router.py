"""The real SGLang router picks the decode: the ``sglang-router:<policy>`` baseline.

``sglang-router:cache_aware`` (or ``power_of_two``, ``round_robin``, ``random``)
names a scheduler whose decisions are made by the router SGLang ships, the
Rust extension of the PyPI package ``sglang-router`` (pinned to 0.3.2 in
requirements.txt; no GPU, no torch, no tokenizer), run in its
prefill-decode mode.  The router believes it fronts real SGLang servers; this
module gives it "faces" instead.

**What runs.** :meth:`SGLangRouter.start` (the ledger calls it once, with the
replay's prefill and decode instance names) starts two child processes and
records their pids (:attr:`SGLangRouter.pids`):

* one *face server* (``python -m netkv.schedulers.sglang_router --faces``), an
  HTTP/1.1 server on 127.0.0.1 with one port per prefill and per decode
  instance;
* the router, ``python -m sglang_router.launch_router --host 127.0.0.1 --port P
  --pd-disaggregation --prefill http://127.0.0.1:F1 none ... --decode
  http://127.0.0.1:G1 ... --policy <policy> --prometheus-host 127.0.0.1
  --prometheus-port M --log-level warn``, and waits until its ``/readiness``
  counts every face healthy.  :meth:`SGLangRouter.close` (``Ledger.close()``)
  ends both, by pid.

**What a face serves** (what the 0.3.2 binary was seen to ask for):
``GET /health`` (503 for a decode that is not live in the replay),
``GET /server_info`` and ``/model_info`` (and the older ``/get_server_info``,
``/get_model_info``: ``served_model_name`` "netkv-face", the router's model id
for them, and no ``model_path``, so the router loads no tokenizer),
``GET /get_load`` (``[{"dp_rank": 0, "num_reqs": active + queued,
"num_waiting_reqs": queued, "num_tokens": used KV tokens}]`` from the decode
views of the last decision; the router sums ``num_tokens`` for
``power_of_two``, polling every 30 s), and ``POST /generate``.  The router sends
each client ``/generate`` to one prefill and one decode face at once, adding
``bootstrap_host``, ``bootstrap_port`` (null: "none") and a random
``bootstrap_room``; a request without ``bootstrap_room`` or not a JSON object is
refused with 400.  The prefill face answers at once.  The decode face records
which prefill face got the same ``bootstrap_room``, tells the scheduler, and
*holds* the router's request open, as a real decode server holds a
non-streaming ``/generate`` until the request has decoded: a decode's held
requests are released, oldest first, down to its ``active + queued`` of each
later decision's views.  So the router's own in-flight count per decode
(``cache_aware``'s balance test, ``power_of_two`` before its first load poll)
is the testbed's load on that decode.  A decode absent from the views (lost)
answers 503, and the router retries elsewhere, as it would.

**The prompt.** The router's ``cache_aware`` policy keeps a radix tree of
request *text* characters.  A request is rendered from its block hashes: each
hash id becomes :data:`CHARS_PER_BLOCK` (64) characters of the URL-safe base64
alphabet, the BLAKE2b digest of the id, so one character stands for
:data:`TOKENS_PER_CHAR` (8) of a block's :data:`~netkv.request.BLOCK_TOKENS`
(512) tokens.  Equal block hashes give equal text blocks, so equal hash
prefixes give equal text prefixes, and the router's match rate (matched
characters / prompt characters) is the matched fraction of the blocks.

**The decision.** Per request the scheduler sends the face server the views'
loads and the request (one line on a pipe); the face server POSTs
``/generate`` (the text, ``rid``, ``sampling_params: {"max_new_tokens":
output_tokens}``) to the router and answers with the decode and the prefill
faces the router chose.  The :class:`~netkv.serving.ledger.Ledger` has already
chosen the prefill with its own chooser and keeps it: *the comparison is of
the decode pick*.  The router's prefill is recorded in the score terms
(``router_prefill_index``, its position in the prefill names given to
:meth:`start`, and ``router_prefill_same``, 1 when it equals the ledger's),
with ``router_attempts`` (decode faces that got the request: more than one
when the router retried), ``round_trip_ms`` and ``matched_blocks``.  The
tokens to send are the input tokens beyond the chosen decode's matched prefix
blocks, as for every baseline.  No answer within ``deadline_ms``, a router
error, or a pick that is not live or cannot admit the request (the router
knows nothing of KV memory or queue room) is a
:class:`~netkv.schedulers.remote.SchedulerFault`: that request fails with the
reason and the replay goes on.  When no decode can admit the request the
router is not asked (:class:`NoEligibleDecode`, as for every baseline).

**cache_aware in 0.3.2 picks at random.** In prefill-decode mode the 0.3.2
binary seeds the radix tree of its per-model policy but never those of the
prefill and decode policy instances it routes with, so every pick logs (at
debug level) ``Warning: No tree found for model 'netkv-face', using random
worker selection``, picks uniformly at random and inserts nothing: no prefix
affinity ever forms (later sglang sources seed them; 0.3.2 is the newest
release on PyPI).  tests/unit/test_sglang_router.py keeps the affinity check
as a strict expected failure, so a router version that fixes it shows.

**What differs from GPUs.** The faces answer at once, so the router's
latencies, its prefill-side in-flight counts and its retry triggers are those
of loopback stubs; the prefill faces report no load; ``/get_load`` is polled
only every 30 s (fixed in the binary), so ``power_of_two`` uses that old
snapshot, or its in-flight counts before the first poll; the radix tree sees
64 characters per 512-token block instead of about 2,000, so its size limit
(``--max-tree-size``) and eviction bite later than on real text.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import functools
import hashlib
import http
import importlib.util
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter, OrderedDict, deque
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from ..oracle import Oracle
from ..request import BLOCK_TOKENS, DecodeView, Request, matched_prefix_blocks
from .base import Decision, Param, Scheduler, SchedulerLoadError, eligible_views, no_eligible, send_tokens
from .remote import SchedulerFault

PREFIX = "sglang-router:"
POLICIES = ("cache_aware", "power_of_two", "round_robin", "random")
DISTRIBUTION = "sglang-router"  # the PyPI package; requirements.txt pins the version the facts were checked with
CHECKED_VERSION = "0.3.2"
TOKENS_PER_CHAR = 8
CHARS_PER_BLOCK = BLOCK_TOKENS // TOKENS_PER_CHAR  # 64: a 48-byte digest in base64
FACE_WAIT_GRACE_S = 1.0  # the face server waits this long past the deadline before it gives a request up
PREFILL_PAIR_WAIT_S = 2.0  # how long a decode face waits for the prefill face's copy of its request
STOP_WAIT_S = 5.0  # how long a child is given to exit after SIGTERM, before SIGKILL
MODEL = "netkv-face"  # the served_model_name the faces report (the router's model id for them)
ROUTES = {"/health": "GET", "/health_generate": "GET", "/server_info": "GET", "/get_server_info": "GET",
          "/model_info": "GET", "/get_model_info": "GET", "/get_load": "GET", "/generate": "POST"}
MAX_BODY_BYTES = 64 << 20
MAX_LINE_BYTES = 256 << 20


# -- the prompt ------------------------------------------------------------------------
@functools.lru_cache(maxsize=1 << 16)
def render_block(hash_id: int) -> str:
    """The text of one prefix block: 64 characters of the URL-safe base64
    alphabet, the BLAKE2b digest of the hash id (equal ids, equal text)."""
    digest = hashlib.blake2b(str(int(hash_id)).encode(), digest_size=CHARS_PER_BLOCK * 3 // 4).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii")


def render_prompt(hash_ids: Iterable[int]) -> str:
    """A request's prompt text: its blocks' texts in order, so that equal hash
    prefixes give equal text prefixes (:data:`CHARS_PER_BLOCK` each)."""
    return "".join(render_block(h) for h in hash_ids)


# -- the face server (a child process) --------------------------------------------------
class RouterError(Exception):
    """The router answered the face server's /generate with an error, or not at all."""


def _response(status: int, payload: Any, keep_alive: bool) -> bytes:
    data = json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", "Content-Type: application/json",
            f"Content-Length: {len(data)}"]
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one write per answer; no 40 ms delayed ACKs


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    first, *rest = head.split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if line:
            key, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"malformed header line {line[:80]!r}")
            headers[key.strip().lower()] = value.strip()
    return first, headers


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, headers = await _read_head(reader)
    status = int(first.split(" ")[1])
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return status, bytes(body[:-2])
            del body[-2:]
    return status, await reader.read()


class Faces:
    """One HTTP face per prefill and per decode instance, on 127.0.0.1, in one
    event loop, driven over stdin / stdout by the scheduler (one JSON object a
    line): ``route`` (ask the router about one request), ``loads`` (the decode
    views' figures), ``release_all``, ``stats``, ``watch`` / ``unwatch`` (the
    router's pid, ended with SIGTERM when stdin closes before ``unwatch``)."""

    def __init__(self, prefills: Sequence[str], decodes: Sequence[str]) -> None:
        self.role = {**{p: "prefill" for p in prefills}, **{d: "decode" for d in decodes}}
        if len(self.role) != len(prefills) + len(decodes):
            raise ValueError("instance names must be distinct")
        self.ports: dict[str, int] = {}
        self.live: set[str] = set(decodes)
        self.loads: dict[str, tuple[int, int, int]] = {d: (0, 0, 0) for d in decodes}  # active, queued, tokens
        self.held: dict[str, deque[asyncio.Future[None]]] = {d: deque() for d in decodes}
        self.rooms: OrderedDict[int, asyncio.Future[str]] = OrderedDict()  # bootstrap_room -> the prefill face
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}  # rid -> what the decode face saw
        self.attempts: Counter[str] = Counter()  # rid -> decode faces that got it
        self.routes: Counter[str] = Counter()  # "METHOD /path STATUS" -> count
        self.router_port = 0
        self.router_pid: int | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- HTTP, the faces' side -------------------------------------------------------
    async def serve_connection(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        try:
            while True:
                try:
                    first, headers = await _read_head(reader)
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except (ValueError, asyncio.LimitOverrunError) as exc:
                    writer.write(_response(400, {"error": f"malformed request: {exc}"}, False))
                    return
                parts = first.split(" ")
                if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                    writer.write(_response(400, {"error": f"malformed request line {first[:80]!r}"}, False))
                    return
                method, target, version = parts
                if "transfer-encoding" in headers:
                    writer.write(_response(411, {"error": "send a Content-Length body"}, False))
                    return
                try:
                    length = int(headers.get("content-length", "0"))
                    if not 0 <= length <= MAX_BODY_BYTES:
                        raise ValueError(length)
                except ValueError:
                    writer.write(_response(400, {"error": "bad Content-Length"}, False))
                    return
                body = await reader.readexactly(length)
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                path = target.split("?", 1)[0]
                status, payload = await self.handle(name, method, path, body)
                self.routes[f"{method} {path} {status}"] += 1
                writer.write(_response(status, payload, keep))
                await writer.drain()
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def handle(self, name: str, method: str, path: str, body: bytes) -> tuple[int, Any]:
        role = self.role[name]
        up = role == "prefill" or name in self.live
        if path not in ROUTES:
            return 404, {"error": f"{path} is not served by a face"}
        if method != ROUTES[path]:
            return 405, {"error": f"{method} is not served on {path}"}
        if path in ("/health", "/health_generate"):
            return (200, {}) if up else (503, {"error": f"decode instance {name} is not live in the replay"})
        if path in ("/server_info", "/get_server_info"):
            return 200, {"disaggregation_mode": role, "dp_size": 1, "tp_size": 1, "served_model_name": MODEL,
                         "netkv_instance": name}
        if path in ("/model_info", "/get_model_info"):
            return 200, {"is_generation": True, "served_model_name": MODEL}  # no model_path: no tokenizer to load
        if path == "/get_load":
            active, queued, tokens = self.loads.get(name, (0, 0, 0))
            return 200, [{"dp_rank": 0, "num_reqs": active + queued, "num_waiting_reqs": queued, "num_tokens": tokens}]
        try:  # POST /generate
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            room = req.get("bootstrap_room")
            if isinstance(room, bool) or not isinstance(room, int):
                raise ValueError("no bootstrap_room: not a request of a prefill-decode router")
            if not isinstance(req.get("text", ""), str):
                raise ValueError("text must be a string")
        except ValueError as exc:
            return 400, {"error": f"{type(exc).__name__}: {exc}"}
        return await (self.prefill_generate(name, room, req) if role == "prefill"
                      else self.decode_generate(name, room, req))

    @staticmethod
    def _answer(req: Mapping[str, Any]) -> dict[str, Any]:
        """A /generate answer of an SGLang server, with nothing generated."""
        sampling = req.get("sampling_params") or {}
        n = sampling.get("max_new_tokens", 0) if isinstance(sampling, dict) else 0
        return {"text": "", "output_ids": [],
                "meta_info": {"id": req.get("rid"), "prompt_tokens": len(req.get("text") or "") * TOKENS_PER_CHAR,
                              "completion_tokens": 0, "cached_tokens": 0,
                              "finish_reason": {"type": "length", "length": n}}}

    def _room(self, room: int) -> asyncio.Future[str]:
        fut = self.rooms.get(room)
        if fut is None:
            fut = self.rooms[room] = asyncio.get_running_loop().create_future()
            while len(self.rooms) > 4096:  # rooms a retry abandoned
                self.rooms.popitem(last=False)
        return fut

    async def prefill_generate(self, name: str, room: int, req: Mapping[str, Any]) -> tuple[int, Any]:
        fut = self._room(room)
        if not fut.done():
            fut.set_result(name)
        return 200, self._answer(req)

    async def decode_generate(self, name: str, room: int, req: Mapping[str, Any]) -> tuple[int, Any]:
        rid = str(req.get("rid"))
        self.attempts[rid] += 1
        if name not in self.live:
            return 503, {"error": f"decode instance {name} is not live in the replay"}
        try:
            prefill: str | None = await asyncio.wait_for(asyncio.shield(self._room(room)), PREFILL_PAIR_WAIT_S)
        except asyncio.TimeoutError:
            prefill = None
        self.rooms.pop(room, None)
        waiter = self.pending.get(rid)
        if waiter is None or waiter.done():
            return 200, self._answer(req)  # not a request being routed now: nothing to hold
        waiter.set_result({"decode": name, "prefill": prefill, "bootstrap_room": room,
                           "bootstrap_host": req.get("bootstrap_host"), "bootstrap_port": req.get("bootstrap_port"),
                           "attempts": self.attempts[rid]})
        release: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.held[name].append(release)
        await release
        return 200, self._answer(req)

    # -- holding -------------------------------------------------------------------------
    def apply_loads(self, loads: Mapping[str, Sequence[int]]) -> None:
        """The decode views of a decision: each live decode keeps ``active +
        queued`` requests held (the oldest are released first), one absent
        from the views is not live and keeps none."""
        self.live = {name for name in loads if name in self.held}
        for name, held in self.held.items():
            if name in loads:
                active, queued, tokens = (int(x) for x in loads[name])
                self.loads[name] = (active, queued, tokens)
                target = active + queued
            else:
                self.loads[name] = (0, 0, 0)
                target = 0
            while len(held) > target:
                release = held.popleft()
                if not release.done():
                    release.set_result(None)

    def release_all(self) -> None:
        for held in self.held.values():
            while held:
                release = held.popleft()
                if not release.done():
                    release.set_result(None)

    # -- the router's client ---------------------------------------------------------------
    async def post_router(self, rid: str, body: bytes) -> None:
        waiter = self.pending[rid]
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.router_port)
            _nodelay(writer)
            writer.write(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1:{self.router_port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
            status, answer = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            if not waiter.done():
                waiter.set_exception(RouterError(f"no answer from the router: {type(exc).__name__}: {exc}"))
            return
        finally:
            if writer is not None:
                writer.close()
        if not waiter.done():
            waiter.set_exception(RouterError(f"the router answered HTTP {status} before a decode face held the "
                                             f"request: {answer[:300].decode(errors='replace')}"))

    async def route(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        rid = str(msg["rid"])
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[dict[str, Any]] = loop.create_future()
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())  # a late error is nobody's
        self.pending[rid] = waiter
        body = json.dumps({"text": render_prompt(msg["hash_ids"]), "rid": rid,
                           "sampling_params": {"max_new_tokens": int(msg["max_new_tokens"])}}).encode()
        task = loop.create_task(self.post_router(rid, body))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        try:
            seen = await asyncio.wait_for(asyncio.shield(waiter), float(msg["timeout_s"]))
            return {"ok": True, **seen}
        except asyncio.TimeoutError:
            return {"ok": False, "error": f"no decode face got the request within {float(msg['timeout_s']):g} s"}
        except RouterError as exc:
            return {"ok": False, "error": str(exc)}
        finally:
            self.pending.pop(rid, None)
            self.attempts.pop(rid, None)

    # -- the control pipe ----------------------------------------------------------------
    @staticmethod
    def reply(msg: Mapping[str, Any]) -> None:
        sys.stdout.buffer.write(json.dumps(msg).encode() + b"\n")
        sys.stdout.buffer.flush()

    async def answer(self, msg: Mapping[str, Any]) -> None:
        out = await self.route(msg)
        self.reply({"seq": msg["seq"], **out})

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        servers = []
        for name in self.role:
            server = await asyncio.start_server(functools.partial(self.serve_connection, name), "127.0.0.1", 0,
                                                limit=MAX_BODY_BYTES)
            servers.append(server)
            self.ports[name] = server.sockets[0].getsockname()[1]
        self.reply({"seq": 0, "ports": self.ports, "pid": os.getpid()})
        stdin = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        try:
            while line := await stdin.readline():
                msg = json.loads(line)
                op = msg.get("op")
                if op == "route":
                    self.apply_loads(msg["decodes"])  # before the router is asked, in the pipe's order
                    task = loop.create_task(self.answer(msg))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                elif op == "loads":
                    self.apply_loads(msg["decodes"])
                elif op == "release_all":
                    self.release_all()
                    self.reply({"seq": msg["seq"], "ok": True})
                elif op == "stats":
                    self.reply({"seq": msg["seq"], "ok": True, "routes": dict(self.routes),
                                "held": {d: len(h) for d, h in self.held.items()}, "live": sorted(self.live)})
                elif op == "watch":  # the router to ask, and to end if the scheduler goes
                    self.router_pid, self.router_port = int(msg["pid"]), int(msg["port"])
                elif op == "unwatch":
                    self.router_pid = None
        finally:
            # stdin closed: the scheduler is done, or gone; a router it did not end goes too
            if self.router_pid is not None:
                try:
                    os.kill(self.router_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            self.release_all()
            await asyncio.sleep(0.05)  # let the released answers go out
            for server in servers:
                server.close()


# -- the scheduler -------------------------------------------------------------------------
def installed_version() -> str:
    """The installed sglang-router's version; SchedulerLoadError when it is missing."""
    if importlib.util.find_spec("sglang_router") is None:
        raise SchedulerLoadError(f"the {PREFIX}<policy> schedulers need the {DISTRIBUTION} package, which is not "
                                 f"installed: pip install {DISTRIBUTION}=={CHECKED_VERSION} (requirements.txt pins "
                                 f"it; scripts/install.sh installs it)")
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 12) -> str:
    """The last lines of a child's log, on one line, without terminal colours."""
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")).strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line[-300:] for line in text[-lines:])


def _stop(proc: subprocess.Popen[bytes], *, terminate: bool) -> None:
    """End a child: SIGTERM (or, with ``terminate`` False, closing its stdin),
    then SIGKILL after :data:`STOP_WAIT_S`; it is reaped either way."""
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    if proc.poll() is None:
        if terminate:
            proc.terminate()
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


_LIVE: "weakref.WeakSet[SGLangRouter]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # a replay that did not close its ledger leaves no router behind
    for sched in list(_LIVE):
        sched.close()


class SGLangRouter(Scheduler):
    """The decode the real SGLang router picks (see the module's docstring)."""

    name = "sglang-router"
    doc = "the real SGLang router (sglang-router, prefill-decode mode) picks the decode, policy from the name"
    params: ClassVar[Mapping[str, Param]] = {
        "deadline_ms": Param(1000.0, 0.001, 60_000.0, "no pick from the router within this fails the request"),
        "startup_s": Param(60.0, 1.0, 600.0, "how long the router is given to count every face healthy"),
    }
    policy: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, object], *, kv_bytes_per_token: int, seed: int = 0) -> None:
        super().__init__(config, kv_bytes_per_token=kv_bytes_per_token, seed=seed)
        if self.policy not in POLICIES:
            raise SchedulerLoadError(f"{type(self).__name__} is not bound to a policy: name it {PREFIX}<policy>")
        self.deadline_ms = self.cfg["deadline_ms"]
        self.prefills: list[str] = []
        self.decodes: list[str] = []
        self.pids: dict[str, int] = {}  # "faces", "router": the children this scheduler started
        self.face_ports: dict[str, int] = {}
        self.router_port = 0
        self.router_argv: list[str] = []
        self._faces: subprocess.Popen[bytes] | None = None
        self._router: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._buf = bytearray()
        self._poll = select.poll()
        self._seq = 0

    # -- life cycle ------------------------------------------------------------------------
    def start(self, prefills: Sequence[str], decodes: Sequence[str]) -> None:
        """Start the face server and the router for these instances, and wait
        until the router counts every face healthy."""
        if self._faces is not None:
            raise RuntimeError(f"{self.name}: started twice")
        installed_version()
        if not prefills or not decodes:
            raise ValueError(f"{self.name}: needs at least one prefill and one decode instance")
        self.prefills, self.decodes = list(prefills), list(decodes)
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="netkv-sglang-"))
        root = str(Path(__file__).resolve().parents[2])  # where the netkv package is importable from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        with open(self._dir / "faces.log", "wb") as log:
            self._faces = subprocess.Popen(
                [sys.executable, "-m", "netkv.schedulers.sglang_router", "--faces", "--prefill", *self.prefills,
                 "--decode", *self.decodes], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
        self.pids["faces"] = self._faces.pid
        assert self._faces.stdout is not None
        self._poll.register(self._faces.stdout.fileno(), select.POLLIN)
        hello = self._read(0, time.perf_counter() + self.cfg["startup_s"])
        if hello is None or "ports" not in hello:
            raise RuntimeError(f"{self.name}: the face server did not start: {_tail(self._dir / 'faces.log')}")
        self.face_ports = {str(k): int(v) for k, v in hello["ports"].items()}
        self.router_port = _free_port()
        url = "http://127.0.0.1:{}".format
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                "--port", str(self.router_port), "--pd-disaggregation"]
        for p in self.prefills:
            argv += ["--prefill", url(self.face_ports[p]), "none"]
        for d in self.decodes:
            argv += ["--decode", url(self.face_ports[d])]
        argv += ["--policy", self.policy, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port()),
                 "--log-level", "warn"]
        self.router_argv = argv
        with open(self._dir / "router.log", "wb") as log:
            self._router = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pids["router"] = self._router.pid
        self._send({"op": "watch", "pid": self._router.pid, "port": self.router_port})
        self._wait_ready(time.monotonic() + self.cfg["startup_s"])

    def _wait_ready(self, deadline: float) -> None:
        import http.client

        want = len(self.prefills) + len(self.decodes)
        seen = "no answer"
        while time.monotonic() < deadline:
            assert self._router is not None
            if self._router.poll() is not None:
                raise RuntimeError(f"{self.name}: the router exited with code {self._router.returncode}: "
                                   f"{self._router_log()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.router_port, timeout=2.0)
                conn.request("GET", "/readiness")
                resp = conn.getresponse()
                seen = resp.read().decode(errors="replace")
                conn.close()
                ready = json.loads(seen)
                if ready.get("healthy_workers") == want and ready.get("total_workers") == want:
                    return
            except (OSError, ValueError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: the router did not count all {want} faces healthy within "
                           f"{self.cfg['startup_s']:g} s (last /readiness: {seen[:200]}): {self._router_log()}")

    def _router_log(self) -> str:
        return _tail(self._dir / "router.log") if self._dir is not None else ""

    def close(self) -> None:
        """End the router and the face server (by pid), and remove their logs.
        The held requests are released first, so the router has nothing in
        flight when it is told to stop."""
        _LIVE.discard(self)
        faces, router = self._faces, self._router
        if faces is not None and faces.poll() is None and router is not None and router.poll() is None:
            try:
                self._seq += 1
                self._send_to(faces, {"op": "release_all", "seq": self._seq})
                self._read(self._seq, time.perf_counter() + 2.0)
                self._send_to(faces, {"op": "unwatch"})
            except (OSError, ValueError, SchedulerFault):
                pass
        self._faces = self._router = None
        if router is not None:
            _stop(router, terminate=True)
        if faces is not None:
            _stop(faces, terminate=False)  # it exits when its stdin closes
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- the pipe ----------------------------------------------------------------------------
    @staticmethod
    def _send_to(proc: subprocess.Popen[bytes], msg: Mapping[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(msg).encode() + b"\n")
        proc.stdin.flush()

    def _send(self, msg: Mapping[str, Any]) -> None:
        if self._faces is None:
            raise SchedulerFault(f"{self.name} is not running (start() was not called, or close() was)")
        try:
            self._send_to(self._faces, msg)
        except OSError as exc:
            raise SchedulerFault(f"the face server is gone ({exc}): {self._faces_log()}") from None

    def _faces_log(self) -> str:
        return _tail(self._dir / "faces.log") if self._dir is not None else ""

    def _read(self, seq: int, deadline: float) -> dict[str, Any] | None:
        """The face server's line answering ``seq`` (older answers, whose
        decision gave up on them, are skipped); None at ``deadline``."""
        assert self._faces is not None and self._faces.stdout is not None
        fd = self._faces.stdout.fileno()
        while True:
            nl = self._buf.find(b"\n")
            while nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                msg = json.loads(line)
                if msg.get("seq") == seq:
                    return msg  # type: ignore[no-any-return]
                nl = self._buf.find(b"\n")
            left = deadline - time.perf_counter()
            if left <= 0 or not self._poll.poll(left * 1000.0):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise SchedulerFault(f"the face server closed its pipe (exit code {self._faces.poll()}): "
                                     f"{self._faces_log()}")
            self._buf += chunk

    def stats(self) -> dict[str, Any]:
        """The routes the router has called on the faces (``"GET /health 200"``
        -> count), the requests held per decode and the live decodes."""
        self._seq += 1
        self._send({"op": "stats", "seq": self._seq})
        out = self._read(self._seq, time.perf_counter() + 10.0)
        if out is None:
            raise SchedulerFault("the face server did not answer")
        return out

    # -- the decision ----------------------------------------------------------------------------
    def choose(self, request: Request, prefill: str, decodes: Sequence[DecodeView], oracle: Oracle,
               now_s: float) -> Decision:
        if not eligible_views(request, decodes):
            raise no_eligible(request, decodes)
        self._seq += 1
        seq = self._seq
        started = time.perf_counter()
        self._send({"op": "route", "seq": seq, "rid": f"{request.request_id}#{seq}", "hash_ids": list(request.hash_ids), "max_new_tokens": request.output_tokens,
                    "timeout_s": self.deadline_ms / 1000.0 + FACE_WAIT_GRACE_S,
                    "decodes": {d.name: [d.active_batch, d.queue_len, d.used_kv_tokens] for d in decodes}})
        answer = self._read(seq, started + self.deadline_ms / 1000.0)
        took_ms = (time.perf_counter() - started) * 1e3
        if answer is None:
            if self._router is not None and self._router.poll() is not None:
                raise SchedulerFault(f"the router exited with code {self._router.returncode}: {self._router_log()}")
            raise SchedulerFault(f"the router did not pick a decode within its deadline of {self.deadline_ms:g} ms")
        if not answer.get("ok"):
            raise SchedulerFault(f"router: {answer.get('error')}")
        name = answer["decode"]
        view = next((d for d in decodes if d.name == name), None)
        if view is None:
            raise SchedulerFault(f"the router picked decode {name!r}, which is not live")
        if not view.eligible(request):
            raise SchedulerFault(f"the router picked decode {name!r}, which cannot admit request "
                                 f"{request.request_id} (no batch slot or queue room, or short of KV memory)")
        router_prefill = answer.get("prefill")
        matched = matched_prefix_blocks(request.hash_ids, view.cached_blocks)
        tokens = send_tokens(request, matched)
        terms = {"matched_blocks": float(matched), "round_trip_ms": took_ms,
                 "router_prefill_index": float(self.prefills.index(router_prefill))
                 if router_prefill in self.prefills else -1.0,
                 "router_prefill_same": 1.0 if router_prefill == prefill else 0.0,
                 "router_attempts": float(answer.get("attempts", 1))}
        return Decision(name, terms, tokens, tokens * self.kv_bytes_per_token, None)


_BOUND: dict[str, type[SGLangRouter]] = {}


def sglang_class(name: str) -> type[SGLangRouter]:
    """The scheduler class of ``sglang-router:<policy>``, one per policy."""
    policy = name[len(PREFIX):]
    if policy not in POLICIES:
        raise SchedulerLoadError(f"scheduler {name!r}: the policy must be one of {', '.join(POLICIES)}")
    installed_version()
    if name not in _BOUND:
        _BOUND[name] = type("SGLangRouter", (SGLangRouter,), {"name": name, "policy": policy})
    return _BOUND[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netkv.schedulers.sglang_router",
                                 description="The face server of the sglang-router baseline (started by the "
                                             "scheduler; driven over stdin and stdout).")
    ap.add_argument("--faces", action="store_true", required=True)
    ap.add_argument("--prefill", nargs="+", required=True, help="prefill instance names")
    ap.add_argument("--decode", nargs="+", required=True, help="decode instance names")
    args = ap.parse_args(argv)
    asyncio.run(Faces(args.prefill, args.decode).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
