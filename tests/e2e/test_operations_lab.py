"""The other operations on the lab, checked from inside the nodes: a stateless deployment (the
environment runs in RAM, the disk is left alone), ``reboot --to`` an environment already on the deploy
partition, the reference one and the deployment system, power through the real BMCs; each refused to
a user without a grant, before any node is touched. Each test leaves its node in the reference
environment (or just powered on again), whatever ran before it."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.conftest import Site
from tests.e2e.test_deploy_lab import assert_runs_reference, assert_runs_userenv, boots, deploy
from tests.test_cli import unix_user

pytestmark = [pytest.mark.lab, pytest.mark.slow]
USER = "kasched-alice"


def operation(site: Site, *args: str) -> dict[str, object]:
    done = site.kasched(*args, "--json")
    assert done.returncode == 0, f"{args}: {done.stderr.strip()[-600:]}"
    result: dict[str, object] = json.loads(done.stdout)
    return result


def inside(site: Site, node: str, command: str) -> list[str]:
    done = site.ssh(site.ip(node), command)
    assert done.returncode == 0, f"{node}: {done.stderr}"
    return done.stdout.split("\n")


def wait_ssh(site: Site, node: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if site.ssh(site.ip(node), "true").returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"{node} did not answer SSH within {timeout:.0f} s")


def test_stateless_deployment_runs_in_ram_and_leaves_the_disk(site: Site) -> None:
    image = site.work / "diskless.cpio.gz"
    if not image.exists():  # the lab's stateless initramfs, as a user's environment
        shutil.copyfile(site.lab_dir / "boot" / "stateless" / "initrd.img", image)
        (site.work / "diskless.yaml").write_text(
            "name: diskless\nvisibility: public\nimage: {file: diskless.cpio.gz, kind: raw, compression: gz}\n"
        )
        added = site.kasched("env", "add", str(site.work / "diskless.yaml"))
        assert added.returncode == 0, added.stderr
    operation(site, "revert", "-m", "node-2")  # whatever the tests before left there
    before = inside(site, "node-2", "sha256sum /dev/sda3")[0].split()[0]
    result = operation(site, "deploy", "-e", "diskless", "--stateless", "-m", "node-2")
    assert result["state"] == "done", result
    system, root, cmdline, after = inside(
        site, "node-2", "cat /etc/kasched-system; awk '$2==\"/\"{print $3}' /proc/mounts | tail -1; "
        "cat /run/kasched/cmdline; sha256sum /dev/sda3",
    )[:4]
    assert (system, root) == ("stateless", "tmpfs") and "kasched.system=stateless" in cmdline
    assert "root=" not in cmdline and after.split()[0] == before  # the deploy partition is untouched
    shown = json.loads(site.kasched("nodes", "show", "node-2", "--json").stdout)
    assert shown["state"] == "deployed" and shown["environment"].startswith("diskless@")
    operation(site, "revert", "-m", "node-2")
    assert_runs_reference(site, "node-2")


def test_reboot_to_the_deployment_system_the_deployed_environment_and_the_reference(site: Site) -> None:
    shown = json.loads(site.kasched("nodes", "show", "node-4", "--json").stdout)
    if shown["state"] != "deployed" or not str(shown["environment"]).startswith("userenv@"):
        code, _, stderr = deploy(site, "node-4")  # run alone; in the suite, an earlier test deployed it
        assert code == 0, stderr
    payload = inside(site, "node-4", "sha256sum /var/payload")[0].split()[0]
    operation(site, "reboot", "--to", "deploy", "-m", "node-4", "--level", "hard")
    system, root, cmdline = inside(
        site, "node-4", "cat /etc/kasched-system; awk '$2==\"/\"{print $3}' /proc/mounts | tail -1; "
        "cat /run/kasched/cmdline"
    )[:3]
    assert (system, root) == ("deploy", "tmpfs") and "kasched.system=deploy" in cmdline
    before = boots(site, "node-4")
    again = operation(site, "reboot", "--to", "userenv", "-m", "node-4")
    node = again["nodes"]["node-4"]  # type: ignore[index]
    assert node["ok"] and node["step"] == "reboot" and set(node["durations"]) == {"reboot"}  # no broadcast
    assert boots(site, "node-4") == before + 1
    assert_runs_userenv(site, "node-4")
    assert inside(site, "node-4", "sha256sum /var/payload")[0].split()[0] == payload
    operation(site, "reboot", "--to", "reference", "-m", "node-4")
    assert_runs_reference(site, "node-4")
    assert json.loads(site.kasched("nodes", "show", "node-4", "--json").stdout)["state"] == "reference"


def test_power_off_status_on_through_the_bmc(site: Site) -> None:
    before = boots(site, "node-3")
    off = operation(site, "power", "off", "-m", "node-3")
    shown = [{key: result[key] for key in ("node", "ok", "step", "error", "value")} for result in off]  # type: ignore[union-attr, index]
    assert shown == [{"node": "node-3", "ok": True, "step": "power_off", "error": None, "value": None}], off
    status = operation(site, "power", "status", "-m", "node-3")
    assert status[0]["value"] == "off", status  # type: ignore[index]
    assert site.ssh(site.ip("node-3"), "true").returncode != 0
    operation(site, "power", "on", "-m", "node-3")
    status = operation(site, "power", "status", "-m", "node-3")
    assert status[0]["value"] == "on", status  # type: ignore[index]
    wait_ssh(site, "node-3")
    assert boots(site, "node-3") == before + 1
    assert inside(site, "node-3", "test -e /run/kasched/cmdline && echo booted")[0] == "booted"


def as_user(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    """A kasched command of an ordinary user (no grant on any node), as its own Unix user."""
    entry = pwd.getpwnam(USER)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "KASCHED_CONFIG": str(site.config),
        "KASCHED_DIRECT": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
    }
    command = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    return subprocess.run(
        [*command, sys.executable, "-m", "kasched", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_refused_without_a_grant_before_any_node_is_touched(site: Site) -> None:
    unix_user(USER)
    state = site.work / "state"
    state.chmod(0o777)  # the ordinary user reads (and may write) the site's database, as in test_cli
    for path in state.glob("kasched.db*"):
        path.chmod(0o666)
    before = boots(site, "node-4")
    reason = f"{USER} may not deploy these nodes: node-4: no active grant"
    for args in (
        ("deploy", "-e", "diskless", "--stateless", "-m", "node-4"),
        ("reboot", "--to", "userenv", "-m", "node-4"),
        ("reboot", "--to", "deploy", "-m", "node-4"),
        ("reboot", "--to", "reference", "-m", "node-4"),
        ("power", "off", "-m", "node-4"),
        ("power", "status", "-m", "node-4"),
    ):
        refused = as_user(site, *args)
        assert refused.returncode == 5, (args, refused.stdout, refused.stderr)
        assert reason in refused.stderr and refused.stderr.count("\n") == 1, (args, refused.stderr)
        assert "Traceback" not in refused.stderr
    assert boots(site, "node-4") == before
