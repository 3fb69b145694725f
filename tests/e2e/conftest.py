"""An 8-node lab on 2 switches, with kasched configured for it, and the environments the end-to-end
tests deploy: a user environment (the lab's base system plus a marker and 64 MiB of random data, so
a broadcast lasts long enough to be interrupted) and the site's reference environment (the lab's
reference partition, as a zstd raw image).

KASCHED_E2E_LAB names the lab (default ``kte``) and KASCHED_E2E_REBOOT_TIMEOUT the site's reboot
timeout (default 20 s), for runs on a machine shared with other labs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# The lab's name (at most 8 lowercase characters); another name lets two runs share the machine.
LAB = os.environ.get("KASCHED_E2E_LAB", "kte")
KASCHED = [sys.executable, "-m", "kasched"]


@dataclass
class Site:
    lab_dir: Path
    work: Path
    config: Path
    user_key: Path
    service_key: Path
    lab: str = LAB  # the lab's name

    def kasched(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """A kasched command run inside the lab's network namespace, as a site's frontend would."""
        env = {
            **os.environ,
            "KASCHED_CONFIG": str(self.config),
            "KASCHED_DIRECT": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]),
        }
        return subprocess.run(
            [*KASCHED, "lab", "exec", "--name", self.lab, "--", *KASCHED, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )

    def ssh(self, node_ip: str, command: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        options = [
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-i",
            str(key or self.service_key),
        ]
        return subprocess.run(
            [*KASCHED, "lab", "exec", "--name", self.lab, "--", "ssh", *options, f"root@{node_ip}", command],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def nodes(self) -> dict[str, dict[str, object]]:
        inventory = yaml.safe_load((self.lab_dir / "inventory.yaml").read_text())
        return {n["name"]: n for n in inventory["clusters"][0]["nodes"]}

    def ip(self, node: str) -> str:
        return str(self.nodes()[node]["ip"])


def _run(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])},
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args[:6])}... failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def _user_environment(site: Site) -> Path:
    from kasched.lab.rootfs import build_rootfs
    from kasched.lab.systems import SystemKeys, make_tree

    keys = SystemKeys(
        host_key=site.lab_dir / "ssh" / "ssh_host_ed25519_key",
        authorized_key=(site.lab_dir / "ssh" / "id_ed25519.pub").read_text(),
    )
    tree = make_tree(build_rootfs(), site.work / "userenv", "userenv", keys)
    (tree / "etc" / "kasched-marker").write_text("deployed by kasched\n")
    (tree / "var" / "payload").parent.mkdir(parents=True, exist_ok=True)
    (tree / "var" / "payload").write_bytes(os.urandom(64 << 20))
    image = site.work / "userenv.tar.zst"
    _run("tar", "-C", str(tree), "--zstd", "-cf", str(image), ".")
    shutil.rmtree(tree)
    (site.work / "userenv.yaml").write_text(
        "name: userenv\nvisibility: public\ndescription: e2e user environment\n"
        "image: {file: userenv.tar.zst, kind: tar}\n"
    )
    return image


def _reference_environment(site: Site) -> Path:
    golden = site.lab_dir / "systems" / "golden.img"
    dump = _run("sfdisk", "--json", str(golden))
    partition = json.loads(dump)["partitiontable"]["partitions"][1]
    raw = site.work / "reference.ext4"
    _run(
        "dd",
        f"if={golden}",
        f"of={raw}",
        "bs=512",
        f"skip={partition['start']}",
        f"count={partition['size']}",
        "status=none",
    )
    _run("zstd", "-q", "-f", "--rm", str(raw), "-o", f"{raw}.zst")
    (site.work / "reference.yaml").write_text(
        "name: lab-reference\nvisibility: public\nreference: true\nimage: {file: reference.ext4.zst, kind: raw}\n"
    )
    return Path(f"{raw}.zst")


def register(site: Site, *descriptions: str) -> None:
    """Import the lab's inventory and add the environments described in ``site.work``."""
    commands = [["nodes", "import", str(site.lab_dir / "inventory.yaml")]]
    for description in descriptions:
        commands.append(["env", "add", str(site.work / description)])
    for command in commands:
        done = site.kasched(*command)
        assert done.returncode == 0, done.stderr


def fresh_work_dir(prefix: str, lab: str) -> Path:
    """A new work directory for a site on lab ``lab``, whose leftovers of an earlier run are removed."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (run scripts/test.sh as root)")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    work.chmod(0o755)
    _run(*KASCHED, "lab", "down", "--name", lab)
    return work


@pytest.fixture(scope="session")
def site() -> Iterator[Site]:
    work = fresh_work_dir("kasched-e2e-", LAB)
    lab_dir = work / "lab"
    _run(
        *KASCHED,
        "lab",
        "up",
        "--name",
        LAB,
        "--state-dir",
        str(lab_dir),
        "--nodes",
        "8",
        "--switches",
        "2",
        "--link",
        "200mbit",
        "--uplink",
        "1gbit",
    )
    try:
        config = work / "kasched.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "site": "lab",
                    "state_dir": str(work / "state"),
                    "boot_dir": str(lab_dir / "boot"),
                    "credentials_file": str(lab_dir / "credentials.yaml"),
                    "service_key": str(lab_dir / "ssh" / "id_ed25519"),
                    # how long a node may take to come back; raise it on a machine shared with other labs
                    "reboot_timeout": float(os.environ.get("KASCHED_E2E_REBOOT_TIMEOUT", "20")),
                }
            )
        )
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@e2e", "-f", str(work / "alice"))
        site = Site(lab_dir, work, config, work / "alice", lab_dir / "ssh" / "id_ed25519")
        _user_environment(site)
        _reference_environment(site)
        register(site, "userenv.yaml", "reference.yaml")
        yield site
    finally:
        subprocess.run(
            [*KASCHED, "lab", "down", "--name", LAB],
            capture_output=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        shutil.rmtree(work, ignore_errors=True)
