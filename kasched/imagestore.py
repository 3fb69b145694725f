"""kaschedd's own copies of environment files: the image and every postinstall script, read once
at ``env add`` and kept content-addressed under ``image_dir/store/<sha256>`` (root only).

Everything after ``env add`` (``env check``, the pre-deploy check, the broadcast, the stateless
publish, the configure step) reads these copies, never the user's path. Admins may instead place
large images under ``image_dir`` themselves and register them in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from kasched import safeopen, urlfetch
from kasched.config import Config
from kasched.errors import InputError, IntegrityError, KaschedError, PermissionDenied

DIGEST = re.compile(r"^[0-9a-f]{64}$")
SCRIPTS_MAX = 64 << 10  # the scripts travel base64 on the configure command line (at most 128 KiB)
# Held from storing new copies to committing the environment that uses them, and from removing an
# environment to dropping the copies nothing else uses: a copy is never dropped under a new user.
lock = threading.Lock()


@dataclass(frozen=True)
class Stored:
    """One file in the store (or an admin's image in place): where, how big, its sha256."""

    path: str
    size: int
    sha256: str


@dataclass
class Ingested:
    """What ``env add`` read: the image and the scripts, and the store files this add created."""

    image: Stored
    scripts: list[Stored] = field(default_factory=list)
    created: list[str] = field(default_factory=list)


class ImageStore:
    """The store of one site (``image_dir``)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # The site's own directory: a link in its path (set by the admin) is resolved once, here.
        self.root = Path(os.path.realpath(config.image_dir))
        self.store = self.root / "store"

    def ingest(
        self, image: str, scripts: list[str], user: str, is_admin: bool, forbidden: set[str], created: list[str]
    ) -> Ingested:
        """Read an environment's image (file, URL, or an admin's file under ``image_dir``) and scripts
        as ``user``, once, into the store. ``created`` gets the store files that did not exist before
        (the caller drops them if the environment is not added)."""
        limit = self.config.image_max_size
        if urlparse(image).scheme in ("http", "https"):
            stored = self._copy_in(urlfetch.fetch(image, self.config.image_url_allow, forbidden, limit), created)
        elif self.inside(image):
            if not is_admin:
                raise PermissionDenied(f"only admins may register images placed under image_dir ({image})")
            stored = self._measure_in_place(image)
        else:
            stored = self._copy_file(image, user, limit, created)
        copies = [self._copy_file(script, user, SCRIPTS_MAX, created, "postinstall scripts") for script in scripts]
        if sum(s.size for s in copies) > SCRIPTS_MAX:
            raise InputError(f"postinstall scripts are larger than {SCRIPTS_MAX} bytes in all", field="postinstall")
        return Ingested(stored, copies, created)

    def inside(self, path: str) -> bool:
        """Whether ``path`` (absolute, normalised) is under ``image_dir``."""
        return path == str(self.root) or path.startswith(str(self.root).rstrip("/") + "/")

    def discard(self, paths: Iterable[str], referenced: set[str]) -> list[str]:
        """Remove the store files of ``paths`` that no environment references; the ones removed."""
        dropped = []
        for path in paths:
            if path in referenced or not self._is_store_file(path):
                continue
            try:
                os.unlink(path)
                dropped.append(path)
            except FileNotFoundError:
                pass
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}.blocks")  # its block list (kasched.partition_digest), if it had one
        return dropped

    def verify(self, location: str, sha256: str, scripts: list[str], label: str) -> None:
        """Read the environment's copies again and refuse it if one changed since it was added."""
        actual = self.sha256_of(location, label)
        if actual != sha256:
            raise IntegrityError(f"environment {label}: image {location} has sha256 {actual}, recorded {sha256}")
        for script in scripts:
            read_script(script, label)

    def sha256_of(self, location: str, label: str) -> str:
        """The sha256 of an image in the store or under ``image_dir`` (opened without following links)."""
        if not self.inside(location):
            raise IntegrityError(
                f"environment {label}: its image {location} is not kasched's copy (it was added before kasched "
                "kept its own copies): add the environment again"
            )
        fd = safeopen.open_regular(location)
        try:
            digest = hashlib.sha256()
            for chunk in safeopen.chunks(fd, None, location):
                digest.update(chunk)
            return digest.hexdigest()
        finally:
            os.close(fd)

    def _copy_file(self, path: str, user: str, limit: int, created: list[str], cap: str = "image_max_size") -> Stored:
        fd = safeopen.open_regular(path, user)
        try:
            return self._copy_in(safeopen.chunks(fd, limit, path, cap), created)
        finally:
            os.close(fd)

    def _measure_in_place(self, path: str) -> Stored:
        fd = safeopen.open_regular(path)
        try:
            digest, size = hashlib.sha256(), 0
            for chunk in safeopen.chunks(fd, None, path):
                digest.update(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        return Stored(path, size, digest.hexdigest())

    def _copy_in(self, source: Iterable[bytes], created: list[str]) -> Stored:
        """Copy ``source`` into a new store file (temporary name, hashed while written, renamed to its
        sha256): readable by root only."""
        self.store.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=self.store, prefix=".incoming-")
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(handle, "wb") as out:
                for chunk in source:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(partial, 0o400)
            target = str(self.store / digest.hexdigest())
            with lock:
                existed = os.path.exists(target)
                os.replace(partial, target)
            if not existed:
                created.append(target)
            return Stored(target, size, digest.hexdigest())
        except BaseException:
            if os.path.exists(partial):
                os.unlink(partial)
            raise

    def _is_store_file(self, path: str) -> bool:
        return os.path.dirname(path) == str(self.store) and bool(DIGEST.match(os.path.basename(path)))


def read_script(path: str, label: str) -> bytes:
    """A postinstall script's stored copy, checked against the sha256 its name records."""
    if not DIGEST.match(os.path.basename(path)):
        raise IntegrityError(
            f"environment {label}: postinstall {path} is not kasched's copy (the environment was added before "
            "kasched kept its own copies): add the environment again"
        )
    try:
        content = safeopen.read_small(path, None, SCRIPTS_MAX, "postinstall scripts")
    except KaschedError as error:
        raise IntegrityError(f"environment {label}: postinstall copy: {error}") from None
    if hashlib.sha256(content).hexdigest() != os.path.basename(path):
        raise IntegrityError(f"environment {label}: postinstall copy {path} changed since it was added")
    return content


def open_image(location: str) -> int:
    """A descriptor on an environment's image copy (checked by :meth:`ImageStore.verify` before use)."""
    if urlparse(location).scheme:
        raise IntegrityError(f"image {location} is not kasched's copy: add the environment again")
    return safeopen.open_regular(location)
