"""Well-known host secrets in an environment's image: what ``kasched doctor`` warns about in the site's
reference environment.

The reference partition is on the node's disk, and a deploy job's user is root on that node: they can
read every byte of it. A secret the reference environment keeps there (Slurm's MUNGE key, a Kerberos
keytab, a cluster-wide SSH key) is theirs after one deploy job (docs/security.md, "No secret on a
node's disk is trusted").

The image is read from kaschedd's own copy (:mod:`kasched.imagestore`), never from a user's path: a raw
ext2/3/4 file system image with ``debugfs`` (read-only, nothing mounted; a compressed one is
decompressed first into a private temporary file), a tarball by listing its members. What was found is
kept per image sha256 under ``state_dir/secrets``, so a second ``doctor`` does not read the image again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kasched import safeopen
from kasched.config import Config
from kasched.errors import KaschedError
from kasched.views import EnvironmentView

# Path in the image -> what it is. Each is the same on every node of a site, or lets its holder act as
# the node (or as root elsewhere): none belongs on a disk a deploy job's user can read.
SECRETS = {
    "/etc/munge/munge.key": "MUNGE key (Slurm's authentication: any uid, root too, to slurmctld and kaschedd)",
    "/etc/slurm/slurm.key": "Slurm auth/slurm key (root to slurmctld)",
    "/etc/slurm/jwt_hs256.key": "Slurm JWT key (tokens for any user)",
    "/etc/krb5.keytab": "Kerberos host keytab (the node's Kerberos identity)",
    "/root/.ssh/id_rsa": "root's SSH private key",
    "/root/.ssh/id_ecdsa": "root's SSH private key",
    "/root/.ssh/id_ed25519": "root's SSH private key",
    "/var/lib/oar/.ssh/id_rsa": "OAR's SSH private key (user oar on the server and every node)",
    "/var/lib/oar/.ssh/id_ed25519": "OAR's SSH private key (user oar on the server and every node)",
}
_DECOMPRESS = {"gz": ["gzip", "-dc"], "xz": ["xz", "-dc"], "zst": ["zstd", "-dcq"]}
_SIZE = re.compile(r"\bSize: (\d+)")
_LIST_ID = hashlib.sha256("\n".join(sorted(SECRETS)).encode()).hexdigest()[:12]  # a new list: a new scan


class ScanError(KaschedError):
    """An image kasched cannot look inside (not ext2/3/4 nor tar, a tool missing, unreadable)."""


@dataclass(frozen=True)
class Found:
    path: str
    what: str


def scan(config: Config, env: EnvironmentView) -> list[Found]:
    """The well-known secrets ``env``'s image holds (non-empty regular files), from the cache or the image."""
    cache = config.state_dir / "secrets" / f"{env.sha256}-{_LIST_ID}.json"
    if re.fullmatch(r"[0-9a-f]{64}", env.sha256) and cache.is_file():
        return [Found(p, SECRETS.get(p, "")) for p in json.loads(cache.read_text()) if p in SECRETS]
    found = sorted(_tar_members(env) if env.image_kind == "tar" else _ext_files(config, env))
    if re.fullmatch(r"[0-9a-f]{64}", env.sha256):
        cache.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        cache.write_text(json.dumps(found))
    return [Found(path, SECRETS[path]) for path in found]


@contextmanager
def _plain(env: EnvironmentView) -> Iterator[IO[bytes]]:
    """The image's bytes, decompressed as it streams (kaschedd's copy, opened without following links)."""
    fd = safeopen.open_regular(env.image_location)
    command = _DECOMPRESS.get(env.compression)
    if command is None:
        with os.fdopen(fd, "rb") as raw:
            yield raw
        return
    try:
        process = subprocess.Popen(command, stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ScanError(f"{command[0]} is not installed: cannot decompress {env.label}'s image") from None
    finally:
        os.close(fd)
    assert process.stdout is not None
    try:
        yield process.stdout
    finally:
        process.stdout.close()
        process.kill()
        process.wait()


def _tar_members(env: EnvironmentView) -> set[str]:
    found = set()
    try:
        with _plain(env) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                path = "/" + member.name.lstrip("./").lstrip("/")
                if path in SECRETS and member.isreg() and member.size > 0:
                    found.add(path)
    except (tarfile.TarError, OSError) as error:
        raise ScanError(f"{env.label}: cannot list its tarball: {error}") from None
    return found


def _ext_files(config: Config, env: EnvironmentView) -> set[str]:
    """The secrets on a raw ext2/3/4 image, with debugfs (read-only)."""
    if env.compression in _DECOMPRESS:
        with _decompressed(config, env) as plain:
            return _debugfs(plain, env.label)
    return _debugfs(Path(env.image_location), env.label)


@contextmanager
def _decompressed(config: Config, env: EnvironmentView) -> Iterator[Path]:
    """The image decompressed into a temporary file only root reads (removed afterwards)."""
    work = config.state_dir / "secrets"
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=work, prefix=".image-")
    try:
        with os.fdopen(handle, "wb") as out, _plain(env) as stream:
            while chunk := stream.read(1 << 20):
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)  # holes for zeros: a file system image is mostly empty
                else:
                    out.write(chunk)
            out.truncate()
        yield Path(name)
    finally:
        os.unlink(name)


def _debugfs(image: Path, label: str) -> set[str]:
    found = set()
    for path in SECRETS:
        try:
            done = subprocess.run(
                ["debugfs", "-R", f"stat {path}", str(image)], capture_output=True, text=True, timeout=60
            )
        except FileNotFoundError:
            raise ScanError("debugfs is not installed (Debian package e2fsprogs)") from None
        except subprocess.TimeoutExpired:
            raise ScanError(f"{label}: debugfs did not answer in 60 s") from None
        if "Bad magic number" in done.stderr or "Can't find valid filesystem superblock" in done.stderr:
            raise ScanError(f"{label}: its raw image is not an ext2/3/4 file system (a whole disk?)")
        size = _SIZE.search(done.stdout)
        if "Type: regular" in done.stdout and size and int(size.group(1)) > 0:
            found.add(path)
    return found
