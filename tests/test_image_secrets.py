"""``kasched doctor`` warns when the site's reference image holds a well-known host secret (the MUNGE
key...): a deploy job's user is root on the node and reads the reference partition. Real ext4 images
(made with mkfs.ext4 -d, read back with debugfs) and a real tarball, added as the reference environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import test_cli
from tests.conftest import EXAMPLES
from tests.test_cli import Run

site, run = test_cli.site, test_cli.run


def root_tree(base: Path, secrets: dict[str, bytes]) -> Path:
    """A small root file system: /etc/hostname, and ``secrets`` (path -> content, mode 400)."""
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("reference\n")
    for path, content in secrets.items():
        target = tree / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o400)
    return tree


def ext4_image(base: Path, secrets: dict[str, bytes], compress: bool) -> Path:
    if (
        shutil.which("mkfs.ext4", path="/usr/sbin:/sbin") is None
        or shutil.which("debugfs", path="/usr/sbin:/sbin") is None
    ):
        pytest.skip("e2fsprogs (mkfs.ext4, debugfs) is not installed")
    image = base / "reference.ext4"
    tree = root_tree(base, secrets)
    subprocess.run(["/usr/sbin/mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True)
    if not compress:
        return image
    subprocess.run(["zstd", "-q", "-f", "--rm", str(image), "-o", f"{image}.zst"], check=True)
    return Path(f"{image}.zst")


def add_reference(run: Run, base: Path, image: Path, kind: str) -> None:
    (base / "reference.yaml").write_text(
        f"name: ref\nvisibility: public\nreference: true\nimage: {{file: {image.name}, kind: {kind}}}\n"
    )
    code, _, err = run("env", "add", str(base / "reference.yaml"))
    assert code == 0, err
    os.unlink(image)  # doctor reads kaschedd's copy, not the admin's file


def secrets_check(run: Run) -> str:
    checks = {c["what"]: c for c in json.loads(run("doctor", "--json")[1])}
    check = checks["reference environment secrets"]
    assert check["ok"], "a warning, not a problem"
    return str(check["detail"])


def test_doctor_warns_of_a_munge_key_in_the_reference_ext4_image(run: Run, site: Path) -> None:
    image = ext4_image(site, {"/etc/munge/munge.key": os.urandom(1024), "/etc/krb5.keytab": b"\x05\x02keytab"}, True)
    add_reference(run, site, image, "raw")
    detail = secrets_check(run)
    assert detail.startswith("warning: ref@root:1's image holds /etc/krb5.keytab (Kerberos host keytab"), detail
    assert "; /etc/munge/munge.key (MUNGE key" in detail, detail
    assert "deliver them at boot to verified reference nodes only, or rotate them after deploy jobs" in detail
    assert list((site / "state" / "secrets").glob("*.json")), "what was found is kept per image"
    assert not [p for p in (site / "state" / "secrets").iterdir() if p.name.startswith(".image-")], "no leftover"
    assert secrets_check(run) == detail, "the second look, from what was kept, says the same"


def test_doctor_finds_nothing_in_a_clean_reference_ext4_image(run: Run, site: Path) -> None:
    image = ext4_image(site, {"/etc/munge/munge.key": b""}, False)  # an empty file holds no key
    add_reference(run, site, image, "raw")
    detail = secrets_check(run)
    assert detail.startswith("none of ") and "well-known host secrets in ref@root:1" in detail, detail


def test_doctor_warns_of_a_munge_key_in_a_reference_tarball(run: Run, site: Path) -> None:
    tree = root_tree(site, {"/etc/munge/munge.key": os.urandom(1024)})
    image = site / "reference.tar.gz"
    with tarfile.open(image, "w:gz") as tar:
        tar.add(tree, arcname=".")
    add_reference(run, site, image, "tar")
    detail = secrets_check(run)
    assert detail.startswith("warning: ref@root:1's image holds /etc/munge/munge.key (MUNGE key"), detail


def test_doctor_says_when_it_cannot_look_inside(run: Run, site: Path) -> None:
    image = site / "disk.img"
    image.write_bytes(os.urandom(1 << 20))  # not a file system (a whole disk, another OS...)
    add_reference(run, site, image, "raw")
    detail = secrets_check(run)
    assert detail == "warning: not checked: ref@root:1: its raw image is not an ext2/3/4 file system (a whole disk?)", (
        detail
    )


def test_doctor_refuses_munge_admin_hosts_that_take_in_a_node(run: Run, site: Path) -> None:
    """A listed network holding a node's address would make that node's deploy-job user an admin."""
    code, _, err = run("nodes", "import", str(EXAMPLES / "cluster.yaml"))  # nodes at 10.77.1.11-14, 10.77.2.15-18
    assert code == 0, err
    config = site / "kasched.yaml"
    config.write_text(config.read_text() + "munge_admin_hosts: [10.77.0.5, 10.77.2.0/24]\n")
    checks = {c["what"]: c for c in json.loads(run("doctor", "--json")[1])}
    assert checks["munge_admin_hosts"] == {
        "what": "munge_admin_hosts",
        "ok": False,
        "detail": "it takes in the address of node-[5-8]: no node belongs there",
    }
    config.write_text(config.read_text().replace("10.77.2.0/24", "192.0.2.0/24"))
    checks = {c["what"]: c for c in json.loads(run("doctor", "--json")[1])}
    assert checks["munge_admin_hosts"]["ok"], checks["munge_admin_hosts"]
