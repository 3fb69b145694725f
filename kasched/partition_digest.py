"""The block list of a raw image: what the reference partition must hold, block by block.

A raw image (decompressed) is cut into fixed-size blocks (:data:`BLOCK`, the last one shorter when
the size is not a multiple); each block gets its SHA-256 and the image's digest is the SHA-256 of
a header naming the hash, the size and the block size, then the block hashes. SHA-256 because
OpenSSL computes it with the CPU's SHA extensions: 1.7 GB/s per core on this machine, scaling with
one thread per core (docs/benchmarks.md), so a disk read (0.5 GB/s SATA, 3 GB/s NVMe with two
cores) stays the limit of a verify.

The list is computed from kaschedd's own copy of the image (decompressed as the environment says,
its sha256 checked against the one recorded at ``env add`` in the same pass), once, and kept beside
it in the store as ``store/<sha256>.blocks`` (root only, read only, written atomically). A reference
environment added before block lists existed gets its list at first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from kasched import safeopen
from kasched.config import Config
from kasched.environments import EnvironmentSpec
from kasched.errors import InputError, IntegrityError, NotFoundError

HASH = "sha256"
BLOCK = 4 << 20  # bytes: large reads on the node, and the unit a patch rewrites
SUFFIX = ".blocks"
# How kaschedd decompresses an image copy (the same programs the nodes run in the broadcast).
DECOMPRESS = {"gz": ["gzip", "-dc"], "xz": ["xz", "-dc"], "zst": ["zstd", "-dc"]}
_READ = 1 << 20
_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()


class ImageCopy(Protocol):
    """What this module needs of an environment (an :class:`~kasched.views.EnvironmentView`)."""

    @property
    def image_kind(self) -> str: ...
    @property
    def compression(self) -> str: ...
    @property
    def image_location(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def label(self) -> str: ...


@dataclass(frozen=True)
class Copy:
    """An image copy named directly (an environment being added has no view yet)."""

    image_kind: str
    compression: str
    image_location: str
    sha256: str
    label: str


@dataclass(frozen=True)
class BlockList:
    """A raw image's size, block size and one hash per block (hex); ``digest`` covers all of them."""

    size: int
    block: int
    hashes: tuple[str, ...]

    @property
    def digest(self) -> str:
        return digest_of(self.size, self.block, self.hashes)

    def extent(self, index: int) -> tuple[int, int]:
        """Block ``index``'s offset and length in the image."""
        offset = index * self.block
        return offset, min(self.block, self.size - offset)

    def to_json(self) -> str:
        return json.dumps(
            {"hash": HASH, "size": self.size, "block": self.block, "hashes": list(self.hashes), "digest": self.digest}
        )

    @classmethod
    def from_json(cls, text: str, what: str) -> BlockList:
        """A list read back from its file, refused unless it is whole and consistent."""
        try:
            data = json.loads(text)
            blocks = cls(int(data["size"]), int(data["block"]), tuple(str(h) for h in data["hashes"]))
            consistent = data["hash"] == HASH and data["digest"] == blocks.digest
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{what}: not a block list") from None
        if not consistent or blocks.block <= 0 or len(blocks.hashes) != block_count(blocks.size, blocks.block):
            raise IntegrityError(f"{what}: the block list does not match its digest")
        return blocks


def block_count(size: int, block: int) -> int:
    return -(-size // block)


def digest_of(size: int, block: int, hashes: Iterable[str]) -> str:
    """The image's digest: SHA-256 of ``kasched-blocks sha256 SIZE BLOCK`` and the hashes, a line each."""
    digest = hashlib.sha256(f"kasched-blocks {HASH} {size} {block}\n".encode())
    for value in hashes:
        digest.update(f"{value}\n".encode())
    return digest.hexdigest()


def hash_blocks(stream: BinaryIO, block: int = BLOCK, threads: int | None = None) -> BlockList:
    """The block list of everything ``stream`` holds, hashed by one thread per CPU (hashlib releases
    the GIL on large buffers) while the next blocks are read."""
    workers = threads or os.cpu_count() or 1
    hashes: list[str] = []
    size = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for data in read_blocks(stream, block):
            size += len(data)
            pending.append(pool.submit(_sha256, data))
            if len(pending) >= 2 * workers:
                hashes.append(pending.pop(0).result())
        hashes.extend(future.result() for future in pending)
    return BlockList(size, block, tuple(hashes))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_blocks(stream: BinaryIO, block: int) -> Iterator[bytes]:
    """``stream`` cut into blocks of ``block`` bytes (the last one shorter)."""
    while True:
        data = stream.read(block)
        if not data:
            return
        while len(data) < block:  # a pipe returns what it has: fill the block
            more = stream.read(block - len(data))
            if not more:
                break
            data += more
        yield data


@contextlib.contextmanager
def raw_stream(location: str, compression: str, sha256: str, label: str) -> Iterator[BinaryIO]:
    """The decompressed content of an image copy, read once; the copy's sha256 is computed in the same
    pass and checked against ``sha256`` when the stream closes (:class:`IntegrityError` if it differs:
    whatever was read from it must then be thrown away)."""
    fd = safeopen.open_regular(location)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb", buffering=0) as source:
        if compression == "none":
            reader = _HashingReader(source, digest)
            yield reader  # type: ignore[misc]
            reader.drain()
        else:
            yield from _decompressed(source, compression, digest, label)
    if digest.hexdigest() != sha256:
        actual = digest.hexdigest()
        raise IntegrityError(f"environment {label}: image {location} has sha256 {actual}, recorded {sha256}")


def _decompressed(source: BinaryIO, compression: str, digest: hashlib._Hash, label: str) -> Iterator[BinaryIO]:
    argv = DECOMPRESS.get(compression)
    if argv is None:
        raise InputError(f"environment {label}: unknown compression {compression!r}")
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin and process.stdout and process.stderr

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError), process.stdin:  # type: ignore[union-attr]
            while chunk := source.read(_READ):
                digest.update(chunk)
                process.stdin.write(chunk)  # type: ignore[union-attr]

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield process.stdout  # type: ignore[misc]
        while process.stdout.read(_READ):  # the rest, so the whole copy is hashed
            pass
    finally:
        process.stdout.close()
        error = process.stderr.read().decode(errors="replace").strip()
        process.stderr.close()
        status = process.wait()
        feeder.join()
    if status != 0:
        raise IntegrityError(f"environment {label}: {argv[0]} cannot decompress the image: {error or status}")


class _HashingReader:
    """A file read through, its bytes added to a digest."""

    def __init__(self, source: BinaryIO, digest: hashlib._Hash) -> None:
        self.source, self.digest = source, digest

    def read(self, size: int) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(_READ):
            pass


def blocks_path(config: Config, sha256: str) -> Path:
    """Where the block list of the image with this sha256 is kept."""
    return Path(os.path.realpath(config.image_dir)) / "store" / f"{sha256}{SUFFIX}"


def expected_blocks(config: Config, env: ImageCopy) -> BlockList:
    """The block list the reference partition must match: read from the store, or computed from
    kaschedd's copy of ``env``'s image (and kept) the first time."""
    if env.image_kind != "raw":
        raise InputError(
            f"environment {env.label}: a reference partition is verified against a raw image, not {env.image_kind}"
        )
    path = blocks_path(config, env.sha256)
    with _lock_for(env.sha256):
        found = _read_list(path)
        if found is not None:
            return found
        with raw_stream(env.image_location, env.compression, env.sha256, env.label) as stream:
            blocks = hash_blocks(stream)
        _write_list(path, blocks)
    return blocks


def record(config: Config, spec: EnvironmentSpec) -> BlockList | None:
    """At ``env add`` of a reference environment (its image in the store): its block list, kept; None
    for an image that is not raw (its partition is rewritten whole, never checked block by block)."""
    if spec.image_kind != "raw":
        return None
    copy = Copy(spec.image_kind, spec.compression, spec.image_location, spec.sha256, spec.name)
    return expected_blocks(config, copy)


def _lock_for(sha256: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(sha256, threading.Lock())


def _read_list(path: Path) -> BlockList | None:
    try:
        text = safeopen.read_small(str(path), None, 64 << 20, "block lists")
    except NotFoundError:
        return None
    return BlockList.from_json(text.decode(errors="replace"), str(path))


def _write_list(path: Path, blocks: BlockList) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
    try:
        with os.fdopen(handle, "w", encoding="ascii") as out:
            out.write(blocks.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(partial, 0o400)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
