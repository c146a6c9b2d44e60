"""Inspecting the controller as users do, on a real tiny fabric (root: Mininet,
Open vSwitch, os-ken, iperf3, Prometheus, Chromium).

- every GET route's real answer matches the served OpenAPI document, and the
  routes the server answers are exactly the routes the document lists;
- a real Prometheus server scrapes /metrics and reads back a known iperf3
  flow's rate on the links of its path;
- headless Chromium loads the fabric view (/) and its DOM shows the flow's
  links near their expected utilisation and an idle link near zero.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import jsonschema
import pytest

from bench.telemetry import rest_get
from testbed.net import Testbed
from tests.integration.common import running_testbed

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    yield from running_testbed("i", poll_interval_s=0.5)


def fetch(url: str, data: bytes | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def example_url(template: str, tb: Testbed) -> str:
    """A concrete URL for a documented route, its required parameters filled in."""
    src, dst = "g0", tb.topo.gpu_names()[-1]
    link = tb.topo.links[0]
    path = template.replace("{src}", link.a).replace("{dst}", link.b)
    query = {"/path": f"?src={src}&dst={dst}", "/oracle": f"?src={src}&dst={dst}&bytes=1000000000"}
    return tb.rest_url.rstrip("/") + path + query.get(template, "")


def wait_for_samples(tb: Testbed, timeout_s: float = 15.0) -> None:
    """Until every directed link has a sample (so /links has rows to check)."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = rest_get(tb.rest_url, "/status")
        if status["hops_measured"] == status["hops_total"] and status["queues"]["interfaces"] > 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"telemetry incomplete: {status}")


def test_every_route_answers_as_the_openapi_document_says(tb: Testbed) -> None:
    wait_for_samples(tb)
    status, ctype, raw = fetch(tb.rest_url.rstrip("/") + "/openapi.json")
    assert status == 200 and ctype.startswith("application/json")
    doc = json.loads(raw)
    assert doc["openapi"].startswith("3.1")
    documented = set(doc["paths"])
    # the routes the server answers, in its own words (the 404 lists them)
    status, _, raw = fetch(tb.rest_url.rstrip("/") + "/no-such-route")
    assert status == 404
    listed = json.loads(raw)["error"].split("known: ", 1)[1].split(", ")
    served_roots = set(listed)
    documented_roots = {"/" + p.strip("/").split("/")[0] for p in documented}
    assert served_roots == documented_roots, (served_roots ^ documented_roots)
    checked = []
    for template in sorted(documented):
        op = doc["paths"][template].get("get")
        assert op is not None, f"{template}: no GET described"
        url = example_url(template, tb)
        status, ctype, raw = fetch(url)
        assert status == 200, (url, raw[:300])
        ((want_type, media),) = op["responses"]["200"]["content"].items()
        assert ctype.split(";")[0] == want_type, (template, ctype)
        body: Any = json.loads(raw) if want_type == "application/json" else raw.decode()
        jsonschema.Draft202012Validator({**media["schema"], "components": doc["components"]}).validate(body)
        checked.append(template)
        if template == "/links":
            assert body["links"] and any(r["queue"] for r in body["links"]), "rows and queues were checked"
        # the error answers are described too
        if op["parameters"] and template not in ("/links",):
            status, _, raw = fetch(url.split("?")[0].replace(tb.topo.links[0].b, "zz") + "?src=g0&dst=nohost")
            assert status in (400, 404), (template, status)
            schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
            jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(json.loads(raw))
    print(f"validated {len(checked)} GET routes against /openapi.json: {checked}")
    # the one POST: a replay report round-trips and its answer matches the document
    report = {"scheduler": "netkv", "requests_done": 1, "requests_total": 2,
              "transfers_in_flight": [{"src": "g0", "dst": tb.topo.gpu_names()[-1], "bytes": 10}], "finished": True}
    status, _, raw = fetch(tb.rest_url.rstrip("/") + "/replay", json.dumps(report).encode())
    assert status == 200, raw
    schema = doc["paths"]["/replay"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(json.loads(raw))
    assert rest_get(tb.rest_url, "/replay")["report"] == report
