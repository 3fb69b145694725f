"""Stateless images under boot_dir/stateless (audit F8, F13): published from kaschedd's copy for the
grants that boot them, in a directory of mode 0750 with boot_dir's group (files 0644: dnsmasq as root
serves world-readable files only), removed when no active grant uses them any
more, and all of them under stateless_quota."""

from __future__ import annotations

import dataclasses
import grp
import gzip
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kasched.api import Kasched
from kasched.deploy.operations import Operations
from kasched.errors import ConflictError
from tests.conftest import EXAMPLES, write


def initramfs(directory: Path, name: str, size: int) -> Path:
    path = directory / f"{name}.cpio.gz"
    path.write_bytes(gzip.compress(os.urandom(size), compresslevel=1))
    write(directory / f"{name}.yaml", f"name: {name}\nvisibility: public\nimage: {{file: {path.name}, kind: raw}}\n")
    return path


@pytest.fixture
def site(admin: Kasched, tmp_path: Path) -> Kasched:
    admin.import_nodes(EXAMPLES / "cluster.yaml")
    (tmp_path / "credentials.yaml").write_text("demo-bmc: {user: a, password: b}\n")
    for name, size in (("st1", 50_000), ("st2", 60_000)):
        initramfs(tmp_path, name, size)
        admin.add_environment(tmp_path / f"{name}.yaml")
    return admin


def stateless_files(api: Kasched) -> list[Path]:
    return sorted((api.config.boot_dir / "stateless").glob("*.img"))


def test_published_for_its_grant_and_removed_when_the_grant_ends(
    site: Kasched, as_user: Callable[[str], Kasched]
) -> None:
    group = grp.getgrnam("nogroup").gr_gid
    site.config.boot_dir.mkdir(parents=True, exist_ok=True)
    os.chown(site.config.boot_dir, 0, group)  # the group a site's TFTP server runs as
    grant = site.grant("alice", "node-[1-2]", hours=1)
    Operations(as_user("alice")).prepare_deploy("st1", "node-[1-2]", stateless=True)
    [published] = stateless_files(site)
    info = published.stat()
    assert stat.S_IMODE(info.st_mode) == 0o644 and (info.st_uid, info.st_gid) == (0, group)
    directory = published.parent.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o750 and (directory.st_uid, directory.st_gid) == (0, group)
    from tests.test_cli import unix_user

    entry = unix_user("kasched-alice")  # a local user outside boot_dir's group cannot read it
    read = subprocess.run(["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
                           "head", "-c1", str(published)], capture_output=True, text=True)  # fmt: skip
    assert read.returncode != 0 and "Permission denied" in read.stderr
    assert published.read_bytes() == Path(site.show_environment("st1").image_location).read_bytes()
    other = site.grant("bob", "node-3", hours=1)
    Operations(as_user("bob")).prepare_deploy("st1", "node-3", stateless=True)  # the same image, two grants
    site.revoke(grant.id)
    assert stateless_files(site) == [published]  # bob's grant still uses it
    site.revoke(other.id)
    assert stateless_files(site) == []


def test_the_quota_refuses_what_would_not_fit_until_a_grant_ends(
    site: Kasched, as_user: Callable[[str], Kasched]
) -> None:
    sizes = {name: site.show_environment(name).image_size for name in ("st1", "st2")}
    api = as_user("alice")
    api.config = dataclasses.replace(site.config, stateless_quota=sizes["st1"] + sizes["st2"] - 1)
    first = site.grant("alice", "node-1", hours=1)
    Operations(api).prepare_deploy("st1", "node-1", stateless=True)
    site.grant("alice", "node-2", hours=1)
    with pytest.raises(ConflictError, match="would pass stateless_quota"):
        Operations(api).prepare_deploy("st2", "node-2", stateless=True)
    site.revoke(first.id)
    Operations(api).prepare_deploy("st2", "node-2", stateless=True)
    assert [p.name for p in stateless_files(site)] == [f"{site.show_environment('st2').sha256}.img"]
