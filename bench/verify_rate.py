"""The reference partition's verify against the slower of its two parts: the disk and the hash.

Run (root): .venv/bin/python bench/verify_rate.py [--size-mib 1024] [--threads 0] [--rounds 3] [--loop-direct-io]
Writes a random image file on this machine's disk and attaches a loop device over it (the lab's
nodes see their disk the same way; ``--loop-direct-io``: the loop device reads its file with direct
I/O, costing the CPUs little, as a real disk's DMA), then, side by side in each round: drops the
page cache and reads the device (the best of: as the verify does without hashing, and sequentially
by one thread through the page cache); hashes as many bytes in memory, 4 MiB blocks, ``threads``
threads (the hash's own rate); drops the page cache again and runs the node program's ``verify`` on
the device as a node runs it (``python3 -I -S -c``), checking its hashes against the image's list.
Prints each rate (best round), each round's verify rate over the slower of its read and hash rates,
and their median as ``RATIO verify = ...``.

``measure()`` is what bench/revert_lab.py imports: the same figures on any device.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

from kasched.partition_digest import BLOCK, HASH, BlockList  # noqa: E402
from kasched.partition_verify import node_command  # noqa: E402
from kasched.transports.partition_node import Verify  # noqa: E402

MIB = 1 << 20
HASHED = 256 * MIB  # the in-memory hash cycles through this much data


@dataclass(frozen=True)
class VerifyRates:
    """Bytes per second of each part, best of the rounds, the threads hashing, and each round's
    verify rate over the slower of its read and hash rates (measured within seconds of each other)."""

    size: int
    threads: int
    read: float
    hash: float
    verify: float
    ratios: tuple[float, ...]

    @property
    def ratio(self) -> float:
        """The median of the rounds' ratios: a machine whose CPUs other work takes moves all three."""
        return statistics.median(self.ratios)

    def lines(self) -> list[str]:
        per_cpu = self.hash / min(self.threads, os.cpu_count() or 1) / MIB
        return [
            f"device read, {self.threads} threads (page cache dropped): {self.read / MIB:8.0f} MiB/s",
            f"hash {HASH} in memory, {self.threads} threads: {self.hash / MIB:8.0f} MiB/s ({per_cpu:.0f} a CPU)",
            f"verify end to end (page cache dropped): {self.verify / MIB:8.0f} MiB/s over {self.size / MIB:.0f} MiB",
            f"verify / min(read, hash) by round: {', '.join(f'{ratio:.2f}' for ratio in self.ratios)}",
            f"RATIO verify = {self.ratio:.2f}",
        ]


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class _ReadOnly(Verify):
    """The verify's reads without its hashing."""

    def digest(self, view: memoryview) -> str:
        return ""


def read_rate(device: str, size: int, threads: int) -> float:
    """The best of the first ``size`` bytes read as the verify reads them but not hashed (``threads``
    threads, direct reads), and read sequentially through the page cache by one thread (4 MiB reads,
    the kernel's read-ahead); the page cache dropped before each."""
    drop_caches()
    job = _ReadOnly(device, size, BLOCK)
    try:
        start = time.perf_counter()
        job.run(threads)
        pattern = size / (time.perf_counter() - start)
    finally:
        job.close()
    drop_caches()
    buffer = memoryview(bytearray(BLOCK))
    fd = os.open(device, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        start, done = time.perf_counter(), 0
        while done < size:
            count = os.readv(fd, [buffer[: min(BLOCK, size - done)]])
            if count == 0:
                raise OSError(f"{device} ends at byte {done}")
            done += count
        return max(pattern, size / (time.perf_counter() - start))
    finally:
        os.close(fd)


def _in_turn(count: int, threads: int, action: Callable[[int], None]) -> None:
    """``action(index)`` for every block index, ``threads`` threads taking them in turn."""
    taken = iter(range(count))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                index = next(taken, None)
            if index is None:
                return
            action(index)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def hash_rate(size: int, threads: int) -> float:
    """SHA-256 of ``size`` bytes of 4 MiB blocks in memory, ``threads`` threads taking blocks in turn,
    from a buffer larger than the CPUs' caches (as blocks read from a disk are not in them)."""
    data = memoryview(os.urandom(min(size, HASHED)))
    places = len(data) // BLOCK or 1
    start = time.perf_counter()
    _in_turn(
        -(-size // BLOCK), threads, lambda index: hashlib.sha256(data[(index % places) * BLOCK :][:BLOCK]).digest()
    )
    return -(-size // BLOCK) * BLOCK / (time.perf_counter() - start)


def verify_rate(run_verify: Callable[[], None], size: int) -> float:
    drop_caches()
    start = time.perf_counter()
    run_verify()
    return size / (time.perf_counter() - start)


def local_verify(device: str, blocks: BlockList, threads: int) -> Callable[[], None]:
    """The node program's verify run here on ``device``, its hashes checked against ``blocks``."""

    def run() -> None:
        command = node_command("verify", device, blocks.size, blocks.block, threads)
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
        if done.returncode != 0 or tuple(done.stdout.split()) != blocks.hashes:
            raise RuntimeError(f"verify failed or differs: {done.stderr.strip()}")

    return run


def measure(
    device: str, size: int, threads: int, rounds: int = 3, run_verify: Callable[[], None] | None = None,
    blocks: BlockList | None = None, say: Callable[[str], None] = print,
) -> VerifyRates:  # fmt: skip
    """The three rates on ``device`` (best of ``rounds``); ``run_verify`` (default: the node program
    run here, checked against ``blocks``) is what the verify's rate times; ``say`` gets each round's line."""
    if run_verify is None:
        if blocks is None:
            raise ValueError("measure() needs blocks or run_verify")
        run_verify = local_verify(device, blocks, threads)
    reads, hashes, verifies = [], [], []
    for round_ in range(rounds):
        reads.append(read_rate(device, size, threads))
        hashes.append(hash_rate(size, threads))
        verifies.append(verify_rate(run_verify, size))
        read, hashed, verified = reads[-1] / MIB, hashes[-1] / MIB, verifies[-1] / MIB
        say(f"round {round_ + 1}: read {read:.0f}, hash {hashed:.0f}, verify {verified:.0f} MiB/s")
    ratios = tuple(v / min(r, h) for r, h, v in zip(reads, hashes, verifies, strict=True))
    return VerifyRates(size, threads, max(reads), max(hashes), max(verifies), ratios)


def random_image(path: Path, size: int) -> BlockList:
    """Write ``size`` random bytes to ``path``; their block list."""
    hashes = []
    with path.open("wb") as out:
        for offset in range(0, size, BLOCK):
            data = os.urandom(min(BLOCK, size - offset))
            hashes.append(hashlib.sha256(data).hexdigest())
            out.write(data)
        out.flush()
        os.fsync(out.fileno())
    return BlockList(size, BLOCK, tuple(hashes))


@contextlib.contextmanager
def loop_device(path: Path, direct_io: bool = False) -> Iterator[str]:
    argv = ["losetup", "--find", "--show", "--read-only", f"--direct-io={'on' if direct_io else 'off'}", str(path)]
    device = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def say(line: str) -> None:
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=0, help="threads reading and hashing (0: CPUs + 2)")
    parser.add_argument("--loop-direct-io", action="store_true", help="the loop device reads its file directly")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MiB, one round")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.rounds = 64, 1
    if args.size_mib <= 0 or args.rounds <= 0 or args.threads < 0:
        parser.error("--size-mib and --rounds must be positive, --threads 0 or more")
    if os.geteuid() != 0:
        parser.error("needs root (a loop device, and dropping the page cache)")
    threads = args.threads or (os.cpu_count() or 1) + 2
    with tempfile.TemporaryDirectory(prefix="kasched-verify-", dir="/var/tmp") as work:
        image = Path(work) / "partition.img"
        blocks = random_image(image, args.size_mib * MIB)
        with loop_device(image, args.loop_direct_io) as device:
            rates = measure(device, blocks.size, threads, args.rounds, blocks=blocks, say=say)
    io = "direct" if args.loop_direct_io else "buffered"
    print(f"loop device ({io} I/O) over a {args.size_mib} MiB file on this disk, {args.rounds} rounds, best of each")
    print("\n".join(rates.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
