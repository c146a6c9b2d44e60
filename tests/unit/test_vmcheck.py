"""scripts/vm-check (guests/vmcheck.py): the pure parts here; the whole check
boots a qemu guest for an hour or more and runs only when asked for
(NETKV_VM_CHECK=1, root)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from guests import common, image, vmguest

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_key_follows_what_builds_the_image() -> None:
    rec = image.recipe("http://mirror.invalid/debian", "http://mirror.invalid/debian-security")
    key = image.recipe_key(rec)
    assert key == image.recipe_key(json.loads(json.dumps(rec)))  # stable
    assert key != image.recipe_key({**rec, "include": [*rec["include"], "vim"]})
    assert key != image.recipe_key({**rec, "mirror": "http://other.invalid/debian"})
    # the image's own files are part of the key
    assert "/usr/local/sbin/netkv-vm-job" in rec["files"]


def test_mirrors_come_from_the_environment_or_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETKV_VM_MIRROR", "http://m.invalid/debian/")
    monkeypatch.setenv("NETKV_VM_SECURITY", "http://m.invalid/debian-security")
    assert image.debian_mirrors() == ("http://m.invalid/debian", "http://m.invalid/debian-security")


def test_ping_summary_and_last_json() -> None:
    out = ("--- 10.0.0.3 ping statistics ---\n10 packets transmitted, 10 received, 0% packet loss\n"
           "rtt min/avg/max/mdev = 60.412/61.020/62.901/0.700 ms\n")
    assert vmguest._ping_stats(out) == {"min": 60.412, "avg": 61.02, "max": 62.901}
    assert vmguest._ping_stats("100% packet loss") == {}
    assert common.last_json('noise\n{"a": 1}\n{"b": 2}\ntrailing') == {"b": 2}
    assert common.last_json("no json") is None


def test_job_script_and_unit_agree_on_the_share() -> None:
    job = image.IMAGE_FILES["/usr/local/sbin/netkv-vm-job"][1]
    assert common.SHARE_TAG in job and common.GUEST_SHARE in job and "poweroff" in job
    assert f"{common.GUEST_SHARE}/repo.tar" in image.JOB_SH and "guests.vmcheck guest" in image.JOB_SH
    # the guest runs the provisioner exactly as the Vagrantfile does
    vagrantfile = (ROOT / "Vagrantfile").read_text()
    assert 'inline: "bash /vagrant/scripts/install.sh"' in vagrantfile and common.GUEST_REPO == "/vagrant"


def test_cli_help_runs_without_root() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts/vm-check"), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--build-only" in proc.stdout


@pytest.mark.skipif(os.environ.get("NETKV_VM_CHECK") != "1",
                    reason="boots a qemu guest for an hour or more under software emulation; "
                           "opt in with NETKV_VM_CHECK=1 (root)")
def test_vm_check_end_to_end() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts/vm-check")], capture_output=True, text=True,
                          timeout=4 * 3600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], json.dumps(result, indent=1)
    assert result["datapath"] == "kernel" and 0.90 <= result["rate_ratio"] <= 1.05
    assert result["requests_in"] == result["records_out"]
    assert result["leftovers_guest"] == 0 and result["leftovers_host"] == 0


def test_host_commands_fail_with_one_line_naming_the_command() -> None:
    assert common.run(["echo", "ok"]).stdout == "ok\n"
    with pytest.raises(common.VmCheckError, match=r"^command failed \(3\): sh -c echo no >&2; exit 3: no$"):
        common.run(["sh", "-c", "echo no >&2; exit 3"])
    with pytest.raises(common.VmCheckError, match="^command not found: netkv-no-such-command"):
        common.run(["netkv-no-such-command"])
    assert common.run(["sh", "-c", "exit 3"], check=False).returncode == 3
