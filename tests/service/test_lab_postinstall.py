"""Audit F1 on the lab: an ordinary user adds an environment whose second postinstall script they
then replace with a symlink to the site's BMC credentials; their first script saves the configure
command (``/proc/$PPID/cmdline``) into the deployed system. After a real deployment through kaschedd,
checked from inside the node: the script read at ``env add`` ran, and nothing of the secret arrived."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator

import pytest
import yaml

from tests.service.test_lab_service import ALICE, ServiceLab, service_lab, slurm_job
from tests.test_cli import unix_user

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab() -> Iterator[ServiceLab]:
    """A 2-node lab with kaschedd (the site of tests/service/test_lab_service.py, smaller)."""
    yield from service_lab(2, (ALICE,), "kasched-post-")


def test_a_script_swapped_for_a_symlink_after_env_add_sends_nothing_secret(lab: ServiceLab) -> None:
    credentials = yaml.safe_load((lab.lab_dir / "credentials.yaml").read_text())
    secrets = sorted({str(entry["password"]) for entry in credentials.values()})
    assert secrets and all(len(s) >= 4 for s in secrets)
    home = lab.alice_key.parent
    (home / "dump.sh").write_text("#!/bin/sh\ncat /proc/$PPID/cmdline > $KASCHED_ROOT/root/loot\n")
    later = home / "later.sh"
    later.write_text("#!/bin/sh\necho read-at-add > $KASCHED_ROOT/root/later-marker\n")
    (home / "mine.yaml").write_text(
        f"name: mine\nimage: {{file: {lab.work / 'userenv.tar.zst'}, kind: tar}}\npostinstall: [dump.sh, later.sh]\n"
    )
    entry = unix_user(ALICE)
    for path in (home / "dump.sh", later, home / "mine.yaml"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    added = lab.kasched(ALICE, "env", "add", str(home / "mine.yaml"))
    assert added.returncode == 0, added.stderr
    later.unlink()
    later.symlink_to(lab.lab_dir / "credentials.yaml")  # the attack, after env add
    os.chown(later, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    slurm_job(lab, "start", "51")
    try:
        done = lab.kasched(ALICE, "deploy", "-e", "mine", "-m", "node-[1-2]", "-k", f"{lab.alice_key}.pub")
        assert done.returncode == 0 and ": done; ok node-[1-2]; failed -" in done.stdout, done.stdout + done.stderr
        for node in ("node-1", "node-2"):
            inside = lab.ssh(node, "cat /root/later-marker; echo ===; tr '\\0' ' ' < /root/loot", user=ALICE)
            assert inside.returncode == 0, f"{node}: {inside.stderr}"
            marker, loot = inside.stdout.split("===\n", 1)
            assert marker.strip() == "read-at-add"  # the script as read at env add ran
            assert "base64 -d" in loot  # the configure command was captured on the node
            original = base64.b64encode(b"#!/bin/sh\necho read-at-add > $KASCHED_ROOT/root/later-marker\n").decode()
            assert original in loot
            payloads = [base64.b64decode(b) for b in re.findall(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", loot)]
            assert len(payloads) == 2, loot
            for secret in secrets:
                assert secret not in loot and all(secret.encode() not in p for p in payloads)
            assert all(b"password" not in p for p in payloads)
    finally:
        slurm_job(lab, "end", "51")
