"""Lab nodes' disks: sparse image files with a real (MBR) partition table, seen as loop devices.

Layout (the inventory says the same): partition 1 swap, partition 2 the reference environment
(ext4, marked bootable: what the firmware boots from disk), partition 3 for deployed environments.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from kasched.errors import LabError
from kasched.lab.system import run

DISK_MIB = 320
SWAP_MIB = 16
REFERENCE_MIB = 96
REFERENCE_PARTITION = 2
DEPLOY_PARTITION = 3
_START_MIB = 1


def partition_offset_mib(number: int) -> int:
    sizes = {1: SWAP_MIB, 2: REFERENCE_MIB}
    return _START_MIB + sum(sizes[n] for n in range(1, number))


def make_golden_disk(image: Path, reference_fs: Path) -> Path:
    """A disk image with the partition table and the reference environment in partition 2."""
    image.unlink(missing_ok=True)
    run(["truncate", "-s", f"{DISK_MIB}M", str(image)])
    table = (
        "label: dos\n"
        f"start={_START_MIB}MiB, size={SWAP_MIB}MiB, type=82\n"
        f"size={REFERENCE_MIB}MiB, type=83, bootable\n"
        "type=83\n"
    )
    run(["sfdisk", "-q", str(image)], input=table)
    offset = partition_offset_mib(REFERENCE_PARTITION)
    run(
        [
            "dd",
            f"if={reference_fs}",
            f"of={image}",
            "bs=1M",
            f"seek={offset}",
            "conv=notrunc,sparse",
            "status=none",
        ],
        timeout=120,
    )
    return image


def copy_disk(golden: Path, image: Path) -> None:
    run(["cp", "--sparse=always", str(golden), str(image)], timeout=120)


def attach(image: Path) -> str:
    """Attach ``image`` to a free loop device, with its partitions; returns ``/dev/loopN``."""
    existing = loops_of(image.parent)
    for device, backing in existing.items():
        if Path(backing) == image:
            return device
    device = run(["losetup", "--find", "--show", "--partscan", str(image)]).strip()
    ensure_partitions(device)
    return device


def ensure_partitions(device: str, timeout: float = 3.0) -> None:
    """Make sure ``<device>p1``... exist (some kernels need ``partx -a`` after ``losetup -P``)."""
    wanted = [Path(f"{device}p{n}") for n in (1, REFERENCE_PARTITION, DEPLOY_PARTITION)]
    if all(p.exists() for p in wanted):
        return
    run(["partx", "-a", device], check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(p.exists() for p in wanted):
            return
        _mknod_from_sysfs(device)
        time.sleep(0.05)
    raise LabError(f"{device}: partitions did not appear (is the loop driver's partscan available?)")


def _mknod_from_sysfs(device: str) -> None:
    name = Path(device).name
    for sys_part in Path(f"/sys/block/{name}").glob(f"{name}p*"):
        node = Path("/dev") / sys_part.name
        if node.exists():
            continue
        major, minor = (int(x) for x in (sys_part / "dev").read_text().split(":"))
        os.mknod(node, 0o600 | 0o060000, os.makedev(major, minor))


def loops_of(directory: Path) -> dict[str, str]:
    """Loop devices whose backing file is under ``directory``: ``{device: backing file}``."""
    out = run(["losetup", "--json", "--list"], check=False)
    if not out.strip():
        return {}
    found = {}
    prefix = str(directory.resolve()) + os.sep
    for entry in json.loads(out).get("loopdevices", []):
        backing = (entry.get("back-file") or "").removesuffix(" (deleted)")
        if backing.startswith(prefix):
            found[entry["name"]] = backing
    return found


def detach_all(directory: Path) -> list[str]:
    """Detach every loop device backed by a file under ``directory`` (also after a crash)."""
    detached = []
    for device in loops_of(directory):
        run(["losetup", "--detach", device], check=False)
        detached.append(device)
    return detached


def partition_table(device: str) -> dict[str, object]:
    table: dict[str, object] = json.loads(run(["sfdisk", "--json", device]))
    return table


def device_numbers(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return os.major(info.st_rdev), os.minor(info.st_rdev)


def remove_images(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
