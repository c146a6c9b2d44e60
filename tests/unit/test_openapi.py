"""The OpenAPI document (controller/openapi.py) against the API's answers, without root,
and the replay report that `netkv run` posts for the fabric view."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from controller import openapi
from controller.rest import Api
from tests.helpers.controller import NOW, loaded_state


@pytest.fixture()
def api() -> Api:
    return Api(loaded_state(), clock=lambda: NOW)


def validate(path: str, body: Any, status: str = "200", method: str = "get") -> None:
    jsonschema.Draft202012Validator(openapi.response_schema(path, status, method)).validate(body)


def test_document_is_a_valid_schema_set() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert json.loads(json.dumps(doc)) == doc


@pytest.mark.parametrize("path,template", [
    ("/status", "/status"), ("/topology", "/topology"), ("/links", "/links"),
    ("/links?group=tier&limit=3", "/links"), ("/links/t0/a1", "/links/{src}/{dst}"),
    ("/path?src=g0&dst=g3", "/path"), ("/oracle?src=g0&dst=g3&bytes=1000000", "/oracle"),
    ("/replay", "/replay"), ("/openapi.json", "/openapi.json"),
])
def test_answers_match_the_document(api: Api, path: str, template: str) -> None:
    status, body = api.handle(path)
    assert status == 200, body
    validate(template, body)


def test_errors_match_the_document(api: Api) -> None:
    status, body = api.handle("/path?src=g0&dst=g99")
    assert status == 404
    validate("/path", body, "404")


def test_schema_rejects_a_wrong_answer(api: Api) -> None:
    _, body = api.handle("/links/t0/a1")
    body["history"][0]["rate_bps"] = "fast"
    with pytest.raises(jsonschema.ValidationError):
        validate("/links/{src}/{dst}", body)


def report(**over: Any) -> bytes:
    body = {"scheduler": "netkv", "requests_done": 3, "requests_total": 10,
            "transfers_in_flight": [{"src": "g0", "dst": "g3", "bytes": 1000}]}
    return json.dumps({**body, **over}).encode()


def test_replay_report_is_stored_and_ages(api: Api) -> None:
    assert api.handle("/replay") == (200, {"active": False, "age_s": None, "report": None})
    status, _, data = api.respond_post("/replay", report())
    assert status == 200, data
    answer = json.loads(data)
    assert answer["active"] and answer["report"]["requests_done"] == 3
    validate("/replay", answer, method="post")
    api.clock = lambda: NOW + 60
    assert api.handle("/replay")[1]["active"] is False
    api.respond_post("/replay", report(finished=True))
    assert api.handle("/replay")[1]["active"] is False


@pytest.mark.parametrize("body,status,fragment", [
    (b"{", 400, "not JSON"),
    (b"[]", 400, "JSON object"),
    (report(speed=3), 400, "unknown keys ['speed']"),
    (report(requests_done=-1), 400, "whole number"),
    (report(requests_done=True), 400, "whole number"),
    (report(transfers_in_flight=[{"src": "g0", "dst": "g99"}]), 400, "unknown GPU host 'g99'"),
    (report(transfers_in_flight=[{"src": "g0"}]), 400, "a transfer must be"),
    (report(finished="yes"), 400, "finished must be"),
    (b"x" * ((1 << 20) + 1), 413, "at most"),
])
def test_bad_replay_reports_get_a_clear_4xx(api: Api, body: bytes, status: int, fragment: str) -> None:
    got, _, data = api.respond_post("/replay", body)
    assert got == status and fragment in json.loads(data)["error"], data


def test_link_rate_answers_match_the_document(api: Api) -> None:
    status, _, data = api.respond_post("/links/v0/t0", b'{"rate_gbps": 100}')
    assert status == 200, data
    validate("/links/{src}/{dst}", json.loads(data), method="post")
    status, _, data = api.respond_post("/links/v0/t0", b'{"rate_gbps": -1}')
    assert status == 400
    validate("/links/{src}/{dst}", json.loads(data), "400", method="post")
    schema = openapi.document()["components"]["schemas"]["LinkRate"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"rate_gbps": 0}, schema)


def test_post_elsewhere_is_refused(api: Api) -> None:
    assert api.respond_post("/status", b"{}")[0] == 405


def test_root_serves_the_fabric_page(api: Api) -> None:
    status, ctype, data = api.respond("/")
    assert status == 200 and ctype.startswith("text/html") and b"<html" in data.lower()


def test_other_methods_get_405_with_allow_on_the_real_server() -> None:
    import http.client

    from controller.rest import serve
    from tests.helpers.net import free_port

    port = free_port()
    server = serve(loaded_state(), "127.0.0.1", port)
    try:
        for method, path, allow in [("TRACE", "/status", "GET"), ("OPTIONS", "/links", "GET"), ("QUERY", "/", "GET"),
                                    ("HEAD", "/", "GET"), ("DELETE", "/replay", "GET, POST"),
                                    ("PUT", "/links/v0/t0", "GET, POST"),
                                    ("POST", "/status", None)]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status == 405, (method, path, resp.status)
            if allow is not None:
                assert resp.getheader("Allow") == allow
            assert (body == b"") == (method == "HEAD")
    finally:
        server.shutdown()
