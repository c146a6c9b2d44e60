"""A replay reports its progress to the controller's /replay (real HTTP server on
127.0.0.1, real worker processes; no root): the fabric view reads it from there."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import topologies
from controller.rest import serve
from controller.state import ControllerState
from tests.helpers.net import free_port
from tests.helpers.replay import HOSTS, base_config
from workers.launch import LocalLauncher
from workers.run import replay


def test_replay_posts_progress_and_says_when_it_finished() -> None:
    port = free_port()
    server = serve(ControllerState(topologies.build("fattree"), scale=1000.0), "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}/replay"
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(url, timeout=5) as resp:
                seen.append(json.loads(resp.read()))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    run_dir = Path(tempfile.mkdtemp(prefix="nkr-"))
    try:
        watcher.start()
        summary = replay(base_config(max_requests=12, rate_multiplier=2.0, scheduler="netkv"), LocalLauncher(),
                         run_dir / "r", status_url=url)
    finally:
        stop.set()
        watcher.join(timeout=10)
        server.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert summary["status_report_failures"] == 0
    running = [s for s in seen if s["active"]]
    assert running, "no progress report was seen while the replay ran"
    assert all(s["report"]["scheduler"] == "netkv" and s["report"]["requests_total"] == 12 for s in running)
    done = [s["report"]["requests_done"] for s in running]
    assert done == sorted(done), "requests done never goes back"
    # every transfer shows in at least one report (0.2 s reads of 0.5 s reports may miss some)
    shown = [t for s in running for t in s["report"]["transfers_in_flight"]]
    assert shown, "no KV transfer was ever reported in flight"
    assert all(t["src"] in HOSTS and t["dst"] in HOSTS and t["src"] != t["dst"] and t["bytes"] > 0 for t in shown)
    last = seen[-1]
    assert last["active"] is False and last["report"]["finished"] is True
    assert last["report"]["requests_done"] == 12 and last["report"]["transfers_in_flight"] == []
    print(f"{len(running)} progress reads while running; done counts {done[0]}..{done[-1]}; "
          f"most transfers in flight at once: {max(len(s['report']['transfers_in_flight']) for s in running)}")


def test_replay_goes_on_when_nothing_listens() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="nkr-"))
    try:
        summary = replay(base_config(max_requests=4, rate_multiplier=4.0), LocalLauncher(), run_dir / "r",
                         status_url=f"http://127.0.0.1:{free_port()}/replay")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert summary["problems"] == [] and summary["status_report_failures"] >= 1
