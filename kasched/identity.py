"""Who is asking: the caller's Unix identity and whether it is a kasched admin."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Caller:
    """A user acting through the CLI or the service. Admins may act on any node and environment."""

    user: str
    is_admin: bool = False

    @classmethod
    def from_uid(cls, uid: int, admin_group: str) -> Caller:
        """The identity of Unix user ``uid``: root and members of ``admin_group`` are admins."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(user=str(uid), is_admin=uid == 0)
        return cls(user=entry.pw_name, is_admin=uid == 0 or _in_group(entry, admin_group))

    @classmethod
    def current(cls, admin_group: str) -> Caller:
        return cls.from_uid(os.getuid(), admin_group)


def _in_group(entry: pwd.struct_passwd, group_name: str) -> bool:
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        return False
    return entry.pw_gid == group.gr_gid or entry.pw_name in group.gr_mem


def can_read(user: str, path: Path) -> bool:
    """Whether Unix user ``user`` could read ``path``: every directory on the way searchable, the file
    readable, by the owner, group or other bits that apply to them. Advisory only: a check by path
    says nothing of what a later open finds (the path may change in between). Files a user names are
    opened as that user instead (:func:`kasched.safeopen.open_regular`); kasched no longer calls this."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return False
    if entry.pw_uid == 0:
        return True
    groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    resolved = Path(path).resolve()
    try:
        for directory in reversed(resolved.parents):
            if not _allowed(directory.stat(), entry.pw_uid, groups, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                return False
        return _allowed(resolved.stat(), entry.pw_uid, groups, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    except OSError:
        return False


def _allowed(info: os.stat_result, uid: int, groups: set[int], owner: int, group: int, other: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & owner)
    if info.st_gid in groups:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)
