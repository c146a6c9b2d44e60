"""Schedulers from outside the repository: by module and class, by entry point,
refused in one line when they are not schedulers, and run like built-in ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import topologies
from netkv.request import Request
from netkv.schedulers import SchedulerLoadError, create, known, provenance, resolve
from netkv.serving.config import ReplayConfig
from netkv.serving.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "nearest_idle"


@pytest.fixture()
def example_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_a_module_and_class_name_runs_in_a_replay_like_a_built_in(example_on_path: None) -> None:
    name = "nearest_idle:NearestIdle"
    cls = resolve(name)
    assert cls.name == "nearest_idle" and create(name, {"slot_wait_ms": 10.0}, kv_bytes_per_token=1).cfg == {
        "slot_wait_ms": 10.0}
    with pytest.raises(ValueError, match="unknown config key 'slot_wait'"):
        create(name, {"slot_wait": 1.0}, kv_bytes_per_token=1)
    records: list[dict[str, Any]] = []
    led = Ledger(ReplayConfig(topology="tiny", scheduler=name), topologies.build("tiny"), records.append)
    order = led.dispatch(Request("r1", 0.0, 1024, 4, (1, 2)), 0.0)
    assert order is not None and order.decode in led.placement.decode
    where = provenance(name)
    assert where["source"] == "module" and where["class"] == "nearest_idle:NearestIdle"
    assert Path(str(where["file"])).name == "__init__.py" and len(str(where["sha256"])) == 64
    assert provenance("netkv") == {"class": "netkv.schedulers.netkv:NetKVScheduler", "source": "built-in"}


def test_an_entry_point_of_an_installed_package_is_found_by_its_name(example_on_path: None, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "netkv_nearest_idle-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: netkv-nearest-idle\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[netkv.schedulers]\nnearest_idle = nearest_idle:NearestIdle\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "nearest_idle" in known()
    assert resolve("nearest_idle").__name__ == "NearestIdle"
    assert provenance("nearest_idle")["source"] == "entry point"


def test_names_that_are_not_schedulers_are_refused_in_one_line(example_on_path: None) -> None:
    for name, message in (("no_such_module:X", "cannot import 'no_such_module': ModuleNotFoundError"),
                          ("nearest_idle:Missing", "module 'nearest_idle' has no 'Missing'"),
                          ("nearest_idle:__version__", "is '0.1.0', not a subclass of netkv.schedulers.Scheduler"),
                          ("no_such_scheduler", "unknown scheduler 'no_such_scheduler'")):
        with pytest.raises(SchedulerLoadError, match=message) as exc:
            resolve(name)
        assert "\n" not in str(exc.value)


def test_the_command_refuses_a_bad_scheduler_before_any_network(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.main", "run", "--topology", "tiny", "--scenario", "none",
                           "--schedulers", "netkv,no_such_module:Sched", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "netkv: error: scheduler 'no_such_module:Sched': cannot import 'no_such_module': ModuleNotFoundError: "
        "No module named 'no_such_module'"]
    assert not (tmp_path / "r").exists()


def test_the_example_package_passes_its_own_test() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{EXAMPLE}:{ROOT}"})
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout
