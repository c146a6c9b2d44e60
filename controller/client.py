"""The one client of the controller's REST API (controller/openapi.py).

Every reader and writer of the API goes through :class:`ControllerClient`:
the fabric (readiness, re-rated links), the replay (telemetry polls, progress
for the fabric view), ``netkv status`` and ``netkv telemetry``, and the
benchmarks.  Two ways to fail: :meth:`ControllerClient.request` raises
:class:`ControllerUnavailable` with one line (the caller says what it could
not do); :meth:`get` and :meth:`post` answer None (the caller carries on:
a poll that can be retried, a convenience view).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_REST_PORT = 8080


def loopback_url(port: int = DEFAULT_REST_PORT) -> str:
    return f"http://127.0.0.1:{port}"


class ControllerUnavailable(OSError):
    """The controller did not answer, or answered with an error (one line)."""


class ControllerClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def request(self, path: str, body: Any = None, *, timeout_s: float = 2.0) -> Any:
        """GET ``path`` (or POST ``body`` as JSON) and return the decoded answer."""
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={} if body is None else {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise ControllerUnavailable(f"{url}: HTTP {exc.code} {detail}".strip()) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ControllerUnavailable(f"cannot read {url}: {getattr(exc, 'reason', exc)}") from None

    def get(self, path: str, *, timeout_s: float = 2.0) -> Any:
        """The answer, or None when the controller is down or refused."""
        try:
            return self.request(path, timeout_s=timeout_s)
        except ControllerUnavailable:
            return None

    def post(self, path: str, body: Any, *, timeout_s: float = 2.0) -> Any:
        """POST ``body`` as JSON; the answer, or None if the controller did not
        accept it (down, or a 4xx)."""
        try:
            return self.request(path, body, timeout_s=timeout_s)
        except ControllerUnavailable:
            return None
