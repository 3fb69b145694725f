"""The node side of the reference partition's check, run in the deployment system: the standard
library only, shipped over SSH as ``python3 -I -S -c SOURCE MODE ...`` (stdin stays free for data).

``verify DEVICE SIZE BLOCK THREADS``: reads the first SIZE bytes of DEVICE in blocks of BLOCK bytes,
THREADS threads at once (0: one per CPU), each reading a block into its own buffer and hashing it
(SHA-256: hashlib releases the GIL on large buffers, so reads and hashes of several blocks overlap),
and prints one hash per block, in order. The pages read are dropped from the page cache behind it.

``patch DEVICE SIZE BLOCK``: reads records from stdin, each a header (offset, length: two unsigned
64-bit big-endian integers) and LENGTH bytes, and writes them at OFFSET. Then fsync, drop the
device's cached pages, read every written range back from the disk and print ``OFFSET HASH`` for it.

It decides nothing: kaschedd compares the hashes with the ones it expects. Errors go to stderr, one
line, and the exit status is 1 (2 for a wrong use).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import sys
import threading
from typing import BinaryIO

RECORD = struct.Struct("!QQ")


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


def verify(device: str, size: int, block: int, threads: int) -> list[str]:
    """The hash of each block of the first ``size`` bytes of ``device``."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = device_size(fd)
        if held < size:
            raise OSError(f"{device} holds {held} bytes, fewer than the reference image's {size}")
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_SEQUENTIAL)
        count = -(-size // block)
        hashes = [""] * count
        state = {"next": 0, "error": None}
        lock = threading.Lock()

        def work() -> None:
            buffer = memoryview(bytearray(block))
            while True:
                with lock:
                    index = state["next"]
                    if index >= count or state["error"] is not None:
                        return
                    state["next"] = index + 1
                offset = index * block
                length = min(block, size - offset)
                try:
                    if read_exactly(fd, buffer[:length], offset) != length:
                        raise OSError(f"{device}: short read at byte {offset}")
                except OSError as error:
                    with lock:
                        state["error"] = state["error"] or error
                    return
                hashes[index] = hashlib.sha256(buffer[:length]).hexdigest()
                drop_cache(fd, offset, length)

        workers = [threading.Thread(target=work) for _ in range(max(1, min(threads or os.cpu_count() or 1, count)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if state["error"] is not None:
            raise state["error"]
        return hashes
    finally:
        os.close(fd)


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
