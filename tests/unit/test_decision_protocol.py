"""Decisions from another process (netkv/schedulers/remote.py): the same
decisions as in process, a late or malformed answer reported per request."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest

import topologies
from netkv.request import Request
from netkv.schedulers import SchedulerLoadError, create, resolve
from netkv.schedulers.remote import OPENAPI, decide, question, serve
from netkv.serving.config import ReplayConfig
from netkv.serving.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nkd-"))  # a Unix socket path must be short
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no server on {path}")


def _replay(scheduler: str, requests: list[Request], **cfg: Any) -> list[dict[str, Any]]:
    """Dispatch every request through a ledger, finishing each at once, so
    that the decode's bookkeeping evolves; the records."""
    records: list[dict[str, Any]] = []
    config = ReplayConfig(scheduler=scheduler, scheduler_config=cfg, topology="fattree")
    led = Ledger(config, topologies.build("fattree"), records.append)
    for i, req in enumerate(requests):
        if led.dispatch(req, 1000.0 + i) is not None and i % 3:  # a third stay in flight and load their decode
            led.fail(req.request_id, "done")
    return records


def _requests(n: int) -> list[Request]:
    return [Request(f"r{i}", 10.0 * i, 600 + 1500 * (i % 7), 5, tuple(range(i % 4, i % 4 + 3)))
            for i in range(n)]


def test_out_of_process_decisions_equal_in_process_ones(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"
    server = subprocess.Popen([sys.executable, "-m", "netkv.schedulers.remote", "--scheduler", "netkv",
                               "--unix", str(path)], cwd=ROOT, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(path)
        reqs = _requests(60)
        local = _replay("netkv", reqs)
        remote = _replay(f"remote+unix://{path}", reqs, deadline_ms=2000.0)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert [r["decode"] for r in remote] == [r["decode"] for r in local]
    assert len({r["decode"] for r in local}) > 3  # the decisions differ from request to request
    # the round trip is inside the decision's time, and the answer's own terms come back
    assert all(r["decision_us"] > 0 and "round_trip_ms" in r["score_terms"] for r in remote)


class _Server:
    """An in-test decision server whose answer the test chooses."""

    def __init__(self, path: Path, answer: Any, delay_s: float = 0.0) -> None:
        def reply(scheduler: Any, body: Any) -> Any:
            time.sleep(delay_s)
            return answer(body)

        self.server = serve(create("netkv", {}, kv_bytes_per_token=131_072), str(path), reply)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_late_answer_fails_its_request_and_the_replay_goes_on(sock_dir: Path) -> None:
    path = sock_dir / "late.sock"
    srv = _Server(path, lambda body: {"decode": body["candidates"][0]["name"]}, delay_s=0.05)
    try:
        records = _replay(f"remote+unix://{path}", _requests(4), deadline_ms=5.0)
    finally:
        srv.close()
    assert len(records) == 4 and all(r["status"] == "failed" for r in records)
    assert all(r["reason"].startswith("scheduler fault: answered in ") and "after its deadline of 5 ms" in r["reason"]
               for r in records)
    assert all(r["decision_us"] >= 50_000 for r in records)  # the whole wait is the decision's


def test_nonsense_answers_are_reported_per_request(sock_dir: Path) -> None:
    answers = iter([{"decode": "g999"}, {"nope": 1}, {"decode": None}, {"decode": "g1", "tokens_to_send": -5}])
    path = sock_dir / "bad.sock"
    srv = _Server(path, lambda body: next(answers))
    try:
        records = _replay(f"remote+unix://{path}", _requests(4), deadline_ms=2000.0)
    finally:
        srv.close()
    reasons = [r["reason"] for r in records]
    assert reasons[0] == "scheduler fault: answered decode 'g999', which it was not offered"
    assert reasons[1].startswith("scheduler fault: answered nonsense: ")
    assert reasons[2] == "scheduler fault: answered decode None, which it was not offered"
    assert reasons[3] == "scheduler fault: answered tokens_to_send -5; a whole number in [0, 5100]"


def test_the_question_and_answer_follow_the_openapi_document() -> None:
    schemas = OPENAPI["components"]["schemas"]
    reqs = _requests(2)
    led = Ledger(ReplayConfig(scheduler="netkv", topology="fattree"), topologies.build("fattree"), lambda r: None)
    views = [v for v in (led.decodes[d] for d in led.placement.decode)][:5]
    from netkv.request import DecodeView

    dviews = [DecodeView(d.name, 0, 1, 128, 10_000, frozenset({0, 1}), 64) for d in views]
    q = question(reqs[0], led.placement.prefill[0], dviews, led.oracle, 1000.0, 131_072, 5.0)
    resolver = {"components": OPENAPI["components"]}
    jsonschema.validate(q, {**schemas["DecideRequest"], **resolver})
    answer = decide(create("netkv", {}, kv_bytes_per_token=131_072), json.loads(json.dumps(q)))
    jsonschema.validate(answer, schemas["DecideAnswer"])
    assert answer["decode"] in {v.name for v in dviews}
    with pytest.raises(ValueError, match="protocol must be 1"):
        decide(create("netkv", {}, kv_bytes_per_token=131_072), {**q, "protocol": 2})


def test_remote_names_are_checked_in_one_line() -> None:
    for name, message in (("remote+ftp://x", "give unix:///path or http://127.0.0.1:PORT"),
                          ("remote+http://10.1.2.3:80", "only a loopback host:port or a Unix socket")):
        with pytest.raises(SchedulerLoadError, match=message):
            resolve(name)
    assert resolve("remote+unix:///tmp/x.sock").endpoint == "unix:///tmp/x.sock"


def test_an_ineligible_choice_is_a_fault_and_no_eligible_is_said_as_in_process(sock_dir: Path) -> None:
    answers = iter([lambda body: {"decode": next(c["name"] for c in body["candidates"] if c["free_kv_tokens"] < 10)},
                    lambda body: {"decode": None, "no_eligible": "every decode is full"}])
    path = sock_dir / "full.sock"
    srv = _Server(path, lambda body: next(answers)(body))
    records: list[dict[str, Any]] = []
    try:
        led = Ledger(ReplayConfig(scheduler=f"remote+unix://{path}", topology="fattree",
                                  scheduler_config={"deadline_ms": 2000.0}), topologies.build("fattree"),
                     records.append)
        full = led.placement.decode[0]
        led.decodes[full].reserved_tokens = led.perf.kv_capacity_tokens  # no KV memory left there
        for i, req in enumerate(_requests(2)):
            led.dispatch(req, 1000.0 + i)
    finally:
        srv.close()
    assert records[0]["reason"] == f"scheduler fault: answered decode {full!r}, which cannot admit request r0"
    assert records[1]["reason"] == "no eligible decode: every decode is full"
