"""The node program of the partition check (kasched.transports.partition_node), run as a node runs it
(``python3 -I -S -c``, the standard library only) on files of this host: the same hashes whether the
device takes direct reads or not and whatever the size, and patch records outside the image refused."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from kasched.partition_verify import node_command
from kasched.transports import partition_node
from kasched.transports.partition_node import RECORD

BLOCK = 1 << 20
SIZE = 3 * BLOCK + 1000  # the last block is short, and not whole pages: read through the page cache


def run(mode: str, device: Path, *numbers: int, data: bytes = b"") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", node_command(mode, str(device), *numbers)], input=data.decode("latin-1"),
                          capture_output=True, text=True, encoding="latin-1", timeout=60)  # fmt: skip


def by_hand(content: bytes) -> list[str]:
    return [hashlib.sha256(content[offset : offset + BLOCK]).hexdigest() for offset in range(0, len(content), BLOCK)]


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
@pytest.mark.parametrize("threads", [1, 3])
def test_verify_prints_each_blocks_hash_in_order(tmp_path: Path, where: str, threads: int) -> None:
    """Whole blocks read with O_DIRECT, the short last one through the page cache: the same hashes as
    the image's, on a disk's file system and on tmpfs."""
    directory = tmp_path if where == "disk" else Path("/dev/shm")
    device = directory / f"kasched-test-{os.getpid()}-{threads}.img"
    content = os.urandom(SIZE + 5000)  # the partition is larger than the image
    device.write_bytes(content)
    try:
        done = run("verify", device, SIZE, BLOCK, threads)
    finally:
        device.unlink()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == by_hand(content[:SIZE])


def test_patch_writes_its_records_and_reads_them_back(tmp_path: Path) -> None:
    device = tmp_path / "sda2"
    device.write_bytes(bytes(SIZE))
    block = os.urandom(BLOCK)
    tail = os.urandom(1000)
    records = RECORD.pack(BLOCK, BLOCK) + block + RECORD.pack(3 * BLOCK, 1000) + tail
    done = run("patch", device, SIZE, BLOCK, data=records)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{BLOCK} {by_hand(block)[0]}", f"{3 * BLOCK} {by_hand(tail)[0]}"]
    assert device.read_bytes() == bytes(BLOCK) + block + bytes(BLOCK) + tail


@pytest.mark.parametrize(
    ("offset", "length"), [(BLOCK + 1, 10), (0, BLOCK + 1), (3 * BLOCK, 1001)], ids=["unaligned", "long", "past-end"]
)
def test_patch_refuses_a_record_that_is_not_a_block_of_the_image(tmp_path: Path, offset: int, length: int) -> None:
    device = tmp_path / "sda2"
    device.write_bytes(bytes(SIZE + BLOCK))
    done = run("patch", device, SIZE, BLOCK, data=RECORD.pack(offset, length) + b"x" * length)
    assert done.returncode == 1 and "is not one block of the image" in done.stderr
    assert device.read_bytes() == bytes(SIZE + BLOCK)


def test_wrong_use_is_a_usage_error(tmp_path: Path) -> None:
    done = run("erase", tmp_path / "sda2", 1)
    assert done.returncode == 2 and done.stderr.startswith("usage: ")


def test_a_device_that_refuses_direct_reads_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = tmp_path / "sda2"
    content = os.urandom(SIZE)
    device.write_bytes(content)
    job = partition_node.Verify(str(device), SIZE, BLOCK)
    direct, plain = job.direct, partition_node.read_exactly
    assert direct is not None
    refused = []

    def read_exactly(fd: int, view: memoryview, offset: int) -> int:
        if fd == direct:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return plain(fd, view, offset)

    monkeypatch.setattr(partition_node, "read_exactly", read_exactly)
    try:
        assert job.run(2) == by_hand(content)
    finally:
        job.close()
    assert 1 <= len(refused) <= 2 and job.direct is None  # each thread tried once at most, then no more
