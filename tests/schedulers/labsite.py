"""What the scheduler lab tests (Slurm, OAR, the PBS stand-in) share: commands run as root with
kasched's packages on the path, a kasched site filled on a lab, and the lab's teardown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

KASCHED = [sys.executable, "-m", "kasched"]
PATH_ENV = os.pathsep.join([str(ROOT), str(ROOT / "plugins")])


def root(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": PATH_ENV})  # fmt: skip
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args[:6])}... failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def user_environment(work: Path, lab_dir: Path) -> None:
    """The lab's base system with a marker file and the lab's service key (a few MiB)."""
    from kasched.lab.rootfs import build_rootfs
    from kasched.lab.systems import SystemKeys, make_tree

    keys = SystemKeys(lab_dir / "ssh" / "ssh_host_ed25519_key", (lab_dir / "ssh" / "id_ed25519.pub").read_text())
    tree = make_tree(build_rootfs(), work / "userenv", "userenv", keys)
    (tree / "etc" / "kasched-marker").write_text("deployed by kasched in an OAR job\n")
    root("tar", "-C", str(tree), "--zstd", "-cf", str(work / "userenv.tar.zst"), ".")
    shutil.rmtree(tree)
    (work / "userenv.yaml").write_text("name: userenv\nvisibility: public\nimage: {file: userenv.tar.zst, kind: tar}\n")


def populate(config: Path, work: Path, lab_dir: Path, lab: str) -> None:
    """The site of ``config`` gets the lab's inventory, the user's environment and the reference one,
    added beside its database in the lab's namespace."""
    from tests.e2e.conftest import Site, _reference_environment

    user_environment(work, lab_dir)
    _reference_environment(Site(lab_dir, work, config, work / "user", lab_dir / "ssh" / "id_ed25519"))
    inlab = [*KASCHED, "lab", "exec", "--name", lab, "--", "env", f"KASCHED_CONFIG={config}", "KASCHED_DIRECT=1",
             *KASCHED]  # fmt: skip
    root(*inlab, "nodes", "import", str(lab_dir / "inventory.yaml"))
    root(*inlab, "env", "add", str(work / "userenv.yaml"))
    root(*inlab, "env", "add", str(work / "reference.yaml"))


def stop(kaschedd: subprocess.Popen[bytes] | None, lab: str, work: Path) -> None:
    """Stop kaschedd (killed if it does not stop within 30 s), take the lab down, remove ``work``."""
    if kaschedd is not None:
        kaschedd.terminate()
        try:
            kaschedd.wait(30)
        except subprocess.TimeoutExpired:
            kaschedd.kill()
    subprocess.run([*KASCHED, "lab", "down", "--name", lab], capture_output=True, timeout=300)
    shutil.rmtree(work, ignore_errors=True)
