"""Testbed pieces that need no root: configuration, rate arithmetic, the
commands built for tc/ethtool, the CLI's error handling, the flow-dump parser,
and the Vagrantfile / CI wiring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.routing import FLOW_COOKIE, FlowEntry
from fabric import shaping
from fabric.config import ConfigError, TestbedConfig, emulated_mbps
from fabric.verify import parse_flow_dump
from netkv.serving.config import wire_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_scale_divides_rates_and_bytes_alike() -> None:
    # A 400 Gbit/s link at 1:20000 is 20 Mbit/s; 1.5 GB of KV becomes 75 kB:
    # both take 30 ms, in the real world and on the emulated link.
    assert emulated_mbps(400, 20_000) == pytest.approx(20.0)
    real_bytes = 1_500_000_000
    real_s = real_bytes * 8 / 400e9
    emu_s = wire_bytes(real_bytes, 20_000) * 8 / (emulated_mbps(400, 20_000) * 1e6)
    assert emu_s == pytest.approx(real_s, rel=1e-6)
    assert wire_bytes(1, 20_000) == 1  # never an empty payload


def test_htb_commands() -> None:
    lines = shaping.tc_batch_lines("nkt0-eth3", 20.0, 1500, 32)
    assert lines[0] == "qdisc replace dev nkt0-eth3 root handle 1: htb default 1"
    assert "rate 20000kbit ceil 20000kbit" in lines[1]
    assert lines[2].endswith("pfifo limit 32")
    # bucket: at least four full frames, and one millisecond of the rate at high rates
    assert shaping.htb_burst_bytes(1.0, 1500) == 4 * 1514
    assert shaping.htb_burst_bytes(1000.0, 1500) == 125_000
    with pytest.raises(ValueError, match="must be > 0"):
        shaping.rate_kbit(0)
    assert shaping.ethtool_offloads_off("x")[:3] == ["ethtool", "-K", "x"]


@pytest.mark.parametrize("changes,fragment", [
    ({"prefix": "NK"}, "prefix must be 2-4 lowercase letters"),
    ({"prefix": "toolong"}, "prefix must be"),
    ({"datapath": "fast"}, "datapath must be one of"),
    ({"scale": 0.5}, "scale must be >= 1"),
    ({"of_port": 80}, "of_port must be a port"),
    ({"of_port": 9000, "rest_port": 9000}, "must differ"),
    ({"poll_interval_s": 0.01}, "poll_interval_s must be"),
    ({"queue_packets": 1}, "queue_packets must be"),
    ({"mtu_bytes": 100}, "mtu_bytes must be"),
    ({"topology": "clos"}, "unknown topology"),
    ({"params": {"pods": 3000}}, "address plan"),
])
def test_config_rejects_bad_values(changes: dict[str, object], fragment: str) -> None:
    cfg = TestbedConfig(**changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=fragment):
        cfg.validate()


def test_config_round_trip_and_unknown_key(tmp_path: Path) -> None:
    cfg = TestbedConfig(topology="tiny", scale=1000.0, prefix="ab")
    path = tmp_path / "testbed.json"
    path.write_text(json.dumps(cfg.to_json()))
    assert TestbedConfig.load(path) == cfg
    path.write_text(json.dumps({**cfg.to_json(), "scael": 2}))
    with pytest.raises(ConfigError, match="unknown testbed setting 'scael'"):
        TestbedConfig.load(path)


def test_flow_dump_parser() -> None:
    text = (f"OFPST_FLOW reply (OF1.3) (xid=0x2):\n"
            f" cookie={FLOW_COOKIE:#x}, duration=1.2s, table=0, n_packets=3, n_bytes=294, "
            f"priority=200,ip,nw_src=10.0.0.1,nw_dst=10.0.0.3 actions=output:2\n"
            f" cookie={FLOW_COOKIE:#x}, duration=1.2s, table=0, n_packets=0, n_bytes=0, "
            f"priority=100,ip,nw_dst=10.0.0.3 actions=output:3\n"
            f" cookie=0x0, duration=1.2s, table=0, priority=0 actions=drop\n")
    assert parse_flow_dump("t0", text) == [FlowEntry("t0", 100, "10.0.0.3", None, 3),
                                           FlowEntry("t0", 200, "10.0.0.3", "10.0.0.1", 2)]


def run_netkv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("args,fragment", [
    (["topo", "--param", "podz=1"], "unknown parameter 'podz'"),
    (["topo", "--param", "pods"], "is not KEY=VALUE"),
    (["topo", "--path", "g0", "g99"], "unknown GPU host 'g99'"),
    (["status", "--prefix", "X1"], "prefix must be"),
])
def test_cli_bad_input_is_one_line(args: list[str], fragment: str) -> None:
    proc = run_netkv(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and fragment in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_topo_describes_default() -> None:
    proc = run_netkv("topo", "--json")
    assert proc.returncode == 0
    summary = json.loads(proc.stdout)
    assert summary["gpus"] == 64 and summary["switches_by_tier"] == {"0": 8, "1": 4, "2": 4, "3": 2}
    path = json.loads(run_netkv("topo", "--path", "g0", "g63", "--json").stdout)
    assert path["tier_distance"] == 3 and len(path["nodes"]) == 9


def test_every_subcommand_has_help() -> None:
    from cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        text = p.format_help()
        assert p.description or p.format_usage(), name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"netkv {name} {action.option_strings[0]} has no help"
        assert len(text) > 80


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is installed by scripts/install.sh")
def test_vagrantfile_is_valid_and_provisions_with_the_ci_install_script() -> None:
    syntax = subprocess.run(["ruby", "-c", str(ROOT / "Vagrantfile")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    proc = subprocess.run(["ruby", str(ROOT / "tests/unit/vagrant_stub.rb"), str(ROOT / "Vagrantfile")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    calls = json.loads(proc.stdout)
    by_path = {c["path"]: c for c in calls}
    assert by_path["config.vm.box"]["value"].startswith("debian/bookworm")
    provision = [c for c in calls if c["path"] == "config.vm.provision"]
    assert len(provision) == 1 and provision[0]["args"] == ["shell"]
    assert provision[0]["kwargs"]["inline"] == "bash /vagrant/scripts/install.sh"
    cpus = [c["value"] for c in calls if c["path"].endswith(".cpus")]
    memory = [c["value"] for c in calls if c["path"].endswith(".memory")]
    assert cpus and min(cpus) >= 2 and memory and min(memory) >= 4096
    assert "127.0.0.1:8080:127.0.0.1:8080" in by_path["config.ssh.extra_args"]["value"]
    # The same script CI runs: .ci/run -> scripts/test -> scripts/install.sh
    assert "scripts/test" in (ROOT / ".ci/run").read_text()
    assert "bash scripts/install.sh" in (ROOT / "scripts/test").read_text()
    assert "bash scripts/install.sh" in (ROOT / "scripts/run").read_text()


def test_ovs_not_running_and_not_startable_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import system

    monkeypatch.setattr(system, "ovs_running", lambda: False)
    monkeypatch.setattr(system, "OVS_CTL", "/nonexistent/ovs-ctl")
    with pytest.raises(system.PreflightError, match="Open vSwitch is not running and ovs-ctl is missing"):
        system.ensure_ovs()


def test_kernel_datapath_refused_where_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from fabric import system

    monkeypatch.setattr(system, "kernel_datapath_available", lambda: False)
    assert system.choose_datapath("auto") == "user"
    assert system.choose_datapath("user") == "user"
    with pytest.raises(system.PreflightError, match="kernel datapath is not available"):
        system.choose_datapath("kernel")
    monkeypatch.setattr(system, "kernel_datapath_available", lambda: True)
    assert system.choose_datapath("auto") == "kernel"


def test_netem_leaf_only_with_delay() -> None:
    assert shaping.tc_batch_lines("x", 10, 1500, 64)[2].endswith("pfifo limit 64")
    assert shaping.tc_batch_lines("x", 10, 1500, 64, delay_ms=0.5)[2].endswith("netem delay 0.5ms limit 64")
    with pytest.raises(ValueError, match="delay_ms must be >= 0"):
        shaping.tc_batch_lines("x", 10, 1500, 64, delay_ms=-1)
