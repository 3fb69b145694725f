"""Built-in plugin: the stateless images published for the nodes' network boot, under
``boot_dir/stateless/<sha256>.img``.

An image is published for the active grants whose nodes boot it (recorded in
``state_dir/stateless.json``), and removed when its last grant is revoked. All of them together stay
under ``stateless_quota``: publishing evicts images no active grant uses, and is refused when that
is not enough. The directory is mode 0750, group of ``boot_dir``: root and the group a site gives an
unprivileged TFTP or HTTP boot server may enter it, other local users may not. The files in it are
mode 0644, because dnsmasq running as root (kasched's own ``dnsmasq_config`` runs it so) serves
only world-readable files. (TFTP itself has no authentication: anything on the boot network that
knows a file's name can fetch it.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from kasched import imagestore, safeopen
from kasched.config import Config
from kasched.db import Database
from kasched.errors import ConflictError, IntegrityError
from kasched.hookspecs import hookimpl
from kasched.models import Grant, utcnow
from kasched.views import EnvironmentView, GrantView

log = logging.getLogger("kasched")
Index = dict[str, dict[str, Any]]  # sha256 -> {"size": bytes, "grants": [grant ids]}


class StatelessImages:
    """Publishes stateless images for grants and removes them when no active grant uses them."""

    def __init__(self, database: Database, config: Config) -> None:
        self.database = database
        self.config = config
        self.directory = config.boot_dir / "stateless"

    def publish(self, env: EnvironmentView, grant_ids: list[int]) -> str:
        """Copy the environment's image (kaschedd's copy) where the network boot finds it, for
        ``grant_ids``; its path relative to ``boot_dir``."""
        relative = f"stateless/{env.sha256}.img"
        with self._index() as index:
            entry = index.setdefault(env.sha256, {"size": env.image_size, "grants": [], "granted": False})
            entry["grants"] = sorted(set(entry["grants"]) | set(grant_ids))
            entry["granted"] = entry["granted"] or bool(grant_ids)
            if not (self.config.boot_dir / relative).exists():
                self._make_room(index, env.image_size, keep=env.sha256)
                self._copy(env, self.config.boot_dir / relative)
        return relative

    @hookimpl
    def kasched_grant_revoked(self, grant: GrantView, reason: str) -> None:
        try:
            self.release(grant.id)
        except (OSError, ValueError) as error:  # never fail the epilog: the grant is revoked already
            log.error("stateless images of grant %d: %s", grant.id, error)

    def release(self, grant_id: int) -> list[str]:
        """Forget ``grant_id``; remove the images no active grant uses any more. The ones removed."""
        if not self._index_path().exists():
            return []
        with self._index() as index:
            active = self._active_grants()
            for entry in index.values():
                entry["grants"] = [g for g in entry["grants"] if g != grant_id]
            # Images published without a grant (an admin's) stay until the quota needs their room.
            gone = [sha for sha, entry in index.items() if entry["granted"] and not set(entry["grants"]) & active]
            for sha in gone:
                self._remove(index, sha)
        return gone

    def _make_room(self, index: Index, size: int, keep: str) -> None:
        used = sum(f.stat().st_size for f in self.directory.glob("*.img")) if self.directory.exists() else 0
        if used + size <= self.config.stateless_quota:
            return
        active = self._active_grants()
        for sha, entry in sorted(index.items(), key=lambda item: -item[1]["size"]):
            if sha != keep and not set(entry["grants"]) & active and used + size > self.config.stateless_quota:
                used -= self._remove(index, sha)
        if used + size > self.config.stateless_quota:
            raise ConflictError(
                f"stateless images in use take {used} bytes: this one ({size} bytes) would pass "
                f"stateless_quota ({self.config.stateless_quota} bytes); try again when a job has ended"
            )

    def _remove(self, index: Index, sha: str) -> int:
        index.pop(sha, None)
        path = self.directory / f"{sha}.img"
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        log.info("stateless image %s removed: no active grant uses it", sha[:16])
        return size

    def _copy(self, env: EnvironmentView, target: Path) -> None:
        """Copy kaschedd's copy to ``target`` (hashed on the way), mode 0644 in a 0750 directory."""
        self.directory.mkdir(parents=True, exist_ok=True)
        group = self.config.boot_dir.stat().st_gid
        os.chmod(self.directory, 0o750)
        handle, partial = tempfile.mkstemp(dir=self.directory, prefix=".partial-")
        try:
            digest = hashlib.sha256()
            source = imagestore.open_image(env.image_location)
            with os.fdopen(handle, "wb") as out, contextlib.closing(_Closer(source)):
                for chunk in safeopen.chunks(source, None, env.image_location):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != env.sha256:
                raise IntegrityError(f"environment {env.label}: its image copy changed since it was added")
            os.chmod(partial, 0o644)  # dnsmasq as root serves world-readable files only; the directory guards
            if os.geteuid() == 0:
                os.chown(partial, 0, group)
                os.chown(self.directory, 0, group)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)

    def _active_grants(self) -> set[int]:
        with self.database.session() as session:
            query = select(Grant.id).where(Grant.revoked_at.is_(None), Grant.expires_at > utcnow())
            return set(session.scalars(query))

    def _index_path(self) -> Path:
        return self.config.state_dir / "stateless.json"

    @contextlib.contextmanager
    def _index(self) -> Iterator[Index]:
        """The index, locked against other processes (kaschedd, a direct-mode CLI), saved atomically."""
        path = self._index_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index: Index = json.loads(path.read_text()) if path.exists() else {}
            yield index
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".stateless-")
            with os.fdopen(handle, "w") as out:
                json.dump(index, out)
            os.replace(temporary, path)


class _Closer:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)
