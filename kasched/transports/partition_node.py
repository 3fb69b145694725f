"""The node side of the reference partition's check, run in the deployment system: the standard
library only, shipped over SSH as ``python3 -I -S -c SOURCE MODE ...`` (stdin stays free for data).

``verify DEVICE SIZE BLOCK THREADS``: reads the first SIZE bytes of DEVICE in blocks of BLOCK bytes,
THREADS threads at once (0: two more than the CPUs, so reads stay queued while blocks are hashed),
each reading a block into its own buffer and hashing it (SHA-256: hashlib releases the GIL on large
buffers, so reads and hashes overlap), and prints one hash per block, in order. Blocks are read
directly from the disk (``O_DIRECT``: no copy through the page cache, nothing of it evicted) where
the device allows it, else through the page cache, dropped behind.

``patch DEVICE SIZE BLOCK``: reads records from stdin, each a header (offset, length: two unsigned
64-bit big-endian integers) and LENGTH bytes, and writes them at OFFSET. Then fsync, drop the
device's cached pages, read every written range back from the disk and print ``OFFSET HASH`` for it.

It decides nothing: kaschedd compares the hashes with the ones it expects. Errors go to stderr, one
line, and the exit status is 1 (2 for a wrong use).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import struct
import sys
import threading
from typing import BinaryIO

RECORD = struct.Struct("!QQ")
ALIGN = 4096  # direct reads: offsets and lengths in whole pages (any logical block size divides it)


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def read_exactly(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``offset``; the bytes read (fewer only at the device's end)."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def drop_cache(fd: int, offset: int, length: int) -> None:
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def open_direct(device: str) -> int | None:
    """``device`` opened for direct reads (no page cache: no copy, nothing evicted), if it allows them."""
    try:
        return os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return None


class Verify:
    """One verify of ``device``: its blocks taken in turn by threads, each read and hashed."""

    def __init__(self, device: str, size: int, block: int) -> None:
        self.device, self.size, self.block = device, size, block
        self.count = -(-size // block)
        self.hashes = [""] * self.count
        self.next = 0
        self.error: OSError | None = None
        self.lock = threading.Lock()
        self.fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        self.direct = open_direct(device)
        self.opened = [self.fd] if self.direct is None else [self.fd, self.direct]

    def run(self, threads: int) -> list[str]:
        held = device_size(self.fd)
        if held < self.size:
            raise OSError(f"{self.device} holds {held} bytes, fewer than the reference image's {self.size}")
        os.posix_fadvise(self.fd, 0, self.size, os.POSIX_FADV_SEQUENTIAL)
        workers = [threading.Thread(target=self.work) for _ in range(max(1, min(threads, self.count)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if self.error is not None:
            raise self.error
        return self.hashes

    def work(self) -> None:
        buffer = memoryview(mmap.mmap(-1, self.block))  # page-aligned, as direct reads need
        while True:
            with self.lock:
                index = self.next
                if index >= self.count or self.error is not None:
                    return
                self.next = index + 1
            offset = index * self.block
            length = min(self.block, self.size - offset)
            try:
                self.read(buffer[:length], offset)
            except OSError as error:
                with self.lock:
                    self.error = self.error or error
                return
            self.hashes[index] = self.digest(buffer[:length])

    def digest(self, view: memoryview) -> str:
        return hashlib.sha256(view).hexdigest()

    def read(self, view: memoryview, offset: int) -> None:
        """Directly from the disk where the device allows it (whole pages), else through the page
        cache (dropped behind)."""
        direct = self.direct if len(view) % ALIGN == 0 else None
        if direct is not None:
            try:
                if read_exactly(direct, view, offset) == len(view):
                    return
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.direct = None  # the file system takes no direct reads
        if read_exactly(self.fd, view, offset) != len(view):
            raise OSError(f"{self.device}: short read at byte {offset}")
        drop_cache(self.fd, offset, len(view))

    def close(self) -> None:
        for fd in self.opened:
            os.close(fd)


def verify(device: str, size: int, block: int, threads: int) -> list[str]:
    """The hash of each block of the first ``size`` bytes of ``device``, ``threads`` threads at once
    (0: two more than the CPUs, so that reads stay queued while blocks are hashed)."""
    job = Verify(device, size, block)
    try:
        return job.run(threads or (os.cpu_count() or 1) + 2)
    finally:
        job.close()


def patch(device: str, size: int, block: int, source: BinaryIO) -> list[str]:
    """Write the records of ``source`` onto ``device``; ``OFFSET HASH`` of each range as read back."""
    fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    try:
        if device_size(fd) < size:
            raise OSError(f"{device} holds {device_size(fd)} bytes, fewer than the reference image's {size}")
        written = []
        while True:
            header = source.read(RECORD.size)
            if not header:
                break
            if len(header) != RECORD.size:
                raise OSError("a record header was cut short")
            offset, length = RECORD.unpack(header)
            if offset % block or length > block or offset + length > size:
                raise OSError(f"a record at byte {offset} of {length} bytes is not one block of the image")
            data = source.read(length)
            if len(data) != length:
                raise OSError(f"the record at byte {offset} was cut short")
            view = memoryview(data)
            while view:
                view = view[os.pwrite(fd, view, offset + length - len(view)) :]
            written.append((offset, length))
        os.fsync(fd)
        drop_cache(fd, 0, 0)
        buffer = memoryview(bytearray(block))
        lines = []
        for offset, length in written:
            if read_exactly(fd, buffer[:length], offset) != length:
                raise OSError(f"{device}: short read at byte {offset}")
            lines.append(f"{offset} {hashlib.sha256(buffer[:length]).hexdigest()}")
            drop_cache(fd, offset, length)
        return lines
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    try:
        mode, device, numbers = argv[0], argv[1], [int(value) for value in argv[2:]]
        if mode == "verify" and len(numbers) == 3:
            lines = verify(device, numbers[0], numbers[1], numbers[2])
        elif mode == "patch" and len(numbers) == 2:
            lines = patch(device, numbers[0], numbers[1], sys.stdin.buffer)
        else:
            raise ValueError(mode)
    except (IndexError, ValueError):
        sys.stderr.write("usage: verify DEVICE SIZE BLOCK THREADS | patch DEVICE SIZE BLOCK\n")
        return 2
    except OSError as error:
        reason = f"{device}: {error.strerror}" if error.strerror else str(error)
        sys.stderr.write(f"{mode}: {reason}\n")
        return 1
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
