"""The replay's telemetry poller (lab.emulator.RestTelemetryPoller)
hands each snapshot to the oracle's refresh: in its own thread until the
replay's event loop is named, then in that loop's thread, so that a refresh
never runs beside a decision holding the interpreter lock."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from lab.emulator import RestTelemetryPoller
from netkv.telemetry import LinkSample, TelemetrySnapshot


class FakeBed:
    """What the poller reads of a testbed: the controller's /links answer."""

    def __init__(self) -> None:
        self.t_s = 100.0

    def rest_get(self, path: str, timeout_s: float = 2.0) -> Any:
        assert path == "/links"
        self.t_s += 1.0
        return TelemetrySnapshot.of([LinkSample("t0", "a0", self.t_s, 1.0, 10.0, 0.1)]).to_json()


def test_refresh_runs_in_the_loop_thread_once_named_and_inline_before_and_after() -> None:
    poller = RestTelemetryPoller(FakeBed(), interval_s=60.0)
    seen: list[tuple[int, float]] = []

    def refresh(snap: TelemetrySnapshot) -> None:
        # called before the source hands the snapshot out
        assert poller() is not snap
        seen.append((threading.get_ident(), snap.get("t0", "a0").t_s))  # type: ignore[union-attr]

    poller.on_update = refresh
    poller._fetch()  # before a loop is named: in the calling (polling) thread
    assert seen == [(threading.get_ident(), 101.0)]
    assert poller().get("t0", "a0").t_s == 101.0  # type: ignore[union-attr]

    async def replay() -> int:
        poller.deliver_in(asyncio.get_running_loop())
        fetcher = threading.Thread(target=poller._fetch)
        fetcher.start()
        fetcher.join()
        assert len(seen) == 1 and poller().get("t0", "a0").t_s == 101.0  # type: ignore[union-attr]
        for _ in range(100):  # the loop runs the hand-over between its callbacks
            await asyncio.sleep(0)
            if len(seen) == 2:
                break
        return threading.get_ident()

    loop_thread = asyncio.run(replay())
    assert seen[1] == (loop_thread, 102.0)
    assert poller().get("t0", "a0").t_s == 102.0  # type: ignore[union-attr]
    # the loop has closed (the replay is over): back to the polling thread, nothing lost
    fetcher = threading.Thread(target=poller._fetch)
    fetcher.start()
    fetcher.join()
    assert seen[2] == (fetcher.ident, 103.0)
    assert poller().get("t0", "a0").t_s == 103.0  # type: ignore[union-attr]
    stats = poller.stop()
    assert stats["telemetry_fetches"] == 3 and stats["telemetry_fetch_failures"] == 0
    # only the refreshes made in the loop can hold up a decision: those are timed
    assert stats["telemetry_refreshes"] == 1
    assert stats["telemetry_refresh_ms_p50"] is not None and stats["telemetry_refresh_ms_p50"] >= 0


def test_failed_fetch_hands_nothing_over() -> None:
    class Down(FakeBed):
        def rest_get(self, path: str, timeout_s: float = 2.0) -> Any:
            return None

    poller = RestTelemetryPoller(Down(), interval_s=60.0)
    calls: list[Any] = []
    poller.on_update = calls.append
    poller._fetch()
    assert calls == [] and poller().samples == {}
    stats = poller.stop()
    assert stats["telemetry_fetch_failures"] == 1 and stats["telemetry_refreshes"] == 0
    assert stats["telemetry_refresh_ms_p99"] is None
